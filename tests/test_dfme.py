import json

import torch
from click.testing import CliRunner

from cli.main import main
from toolkit.attacks.dfme import resolve, victim_targets
from toolkit.training.target import train_target


def test_victim_targets_recover_logits_and_the_released_flaw():
    logits = torch.randn(5, 10) * 4
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(victim_targets(p), logits - logits.mean(1, keepdim=True), atol=1e-4, rtol=1e-4)
    flawed = victim_targets(p, released_prob_as_logit=True)
    torch.testing.assert_close(flawed, p - p.mean(1, keepdim=True), atol=1e-6, rtol=1e-6)  # log_softmax(p) - mean


def test_presets_fill_only_what_the_spec_leaves_open():
    assert resolve({"batch_size": None, "lr_G": None, "grad_m": None, "grad_epsilon": None}, "canonical") == {
        "batch_size": 256, "lr_G": 1e-4, "grad_m": 1, "grad_epsilon": 1e-3}
    assert resolve({"batch_size": 64, "lr_G": None, "grad_m": None, "grad_epsilon": None},
                   "misleader-released")["batch_size"] == 64


def test_dfme_spends_whole_iterations_within_budget(tmp_path, cli_env):
    victim = tmp_path / "victim"
    train_target({"kind": "target", "name": "v", "dataset": {"name": "mnist", "val_size": 500, "limit": 3000},
                  "model": {"architecture": "lenet5_fifth"}, "train": {"epochs": 1, "optimizer": {"name": "adam"}}},
                 out=victim)
    spec = {"kind": "threat", "name": "d", "attack": "dfme", "victim": str(victim), "budget": 5000,
            "clone": {"architecture": "lenet5_fifth"}, "progress_every": 2000,
            "dfme": {"batch_size": 64, "ngf": 16, "nz": 32}}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["extract", str(path), "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    cost = 64 * (1 * (1 + 1) + 5)  # B * (g_iter * (m + 1) + d_iter)
    assert out["queries_used"] == (5000 // cost) * cost
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["curve"][-1]["queries"] == out["queries_used"] and 0 <= out["clone_test_acc"] <= 1
    # the reference query space sends pixels outside [0, 1]: the oracle took them and the record says so
    assert record["spec"]["dfme"]["query_space"] == "reference"
    assert record["spec"]["oracle"]["accept_out_of_range"] is True
    refused = {**spec, "oracle": {"accept_out_of_range": False}}
    path.write_text(json.dumps(refused))
    result = CliRunner().invoke(main, ["extract", str(path), "--out", str(tmp_path / "run2")])
    assert result.exit_code == 2 and "$.oracle.accept_out_of_range" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_schedule_budget_makes_a_short_run_the_start_of_the_paper_budget_run():
    """budget 300k with schedule_budget 2M follows the 2M run's learning rates step for step (a truncated paper run);
    without it the whole schedule is squeezed into 300k queries and its rates drop far earlier."""
    from types import SimpleNamespace

    from toolkit.attacks.dfme import DFMEAttack
    from toolkit.models.generators import dfme_generator
    from toolkit.models.registry import build_model
    from toolkit.schemas import load_spec

    cfg = resolve(load_spec({"kind": "threat", "attack": "dfme", "victim": "v", "budget": 1})["dfme"], "canonical")
    clone, generator = build_model("lenet5_fifth", (1, 32, 32), 10), dfme_generator(8, (1, 32, 32), ngf=8)

    def rates(budget, schedule_budget=None):
        attack = DFMEAttack(SimpleNamespace(budget=budget), clone, generator,
                            {**cfg, "schedule_budget": schedule_budget}, [0.13], [0.31])
        steps = (300_000 // attack.cost) * cfg["d_iter"]
        return [attack.opt_s.mtk_schedule(s) for s in range(steps)], [attack.opt_g.mtk_schedule(s) for s in range(steps)]

    paper = rates(2_000_000)
    assert rates(300_000, schedule_budget=2_000_000) == paper
    squeezed = rates(300_000)
    assert squeezed != paper and squeezed[0][-1] < paper[0][-1] / 3  # one more 0.3x drop at least by 300k


def test_query_spaces_map_the_generators_tanh_as_named():
    """'reference' = mean + std * tanh (cake-lab: the tanh is the victim's normalised input), 'reference-clipped' the
    same clipped to [0, 1], 'unit' = (tanh + 1) / 2 (mtk's mapping before the faithfulness check)."""
    from toolkit.attacks.dfme import pixels

    pre = torch.tensor([-50.0, 0.0, 50.0]).view(1, 1, 1, 3)  # tanh -1, 0, 1
    mean, std = [0.1307], [0.3081]
    torch.testing.assert_close(pixels(pre, "reference", mean, std).flatten(), torch.tensor([-0.1774, 0.1307, 0.4388]))
    torch.testing.assert_close(pixels(pre, "reference-clipped", mean, std).flatten(),
                               torch.tensor([0.0, 0.1307, 0.4388]))
    torch.testing.assert_close(pixels(pre, "unit", mean, std).flatten(), torch.tensor([0.0, 0.5, 1.0]))
    rgb = pixels(torch.zeros(2, 3, 4, 4), "reference", [0.1, 0.2, 0.3], [1.0, 1.0, 1.0])  # per channel
    assert torch.equal(rgb[:, :, 0, 0], torch.tensor([[0.1, 0.2, 0.3]] * 2))


def test_oracle_takes_pixels_outside_unit_range_only_when_asked():
    from toolkit.artifacts import ModelDeployable
    from toolkit.errors import UserError
    from toolkit.models import build_model
    from toolkit.oracle import Oracle
    import pytest

    model = build_model("lenet5_fifth", (1, 32, 32), 10, [0.13], [0.31])
    victim = ModelDeployable(model, {"dataset": {"input_shape": [1, 32, 32], "num_classes": 10}})
    x = torch.full((3, 1, 32, 32), -0.17)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        Oracle(victim, budget=10).query(x)
    oracle = Oracle(victim, budget=10, accept_out_of_range=True)
    assert oracle.query(x).shape == (3, 10) and oracle.queries_used == 3


def test_cake_lab_steps_its_scheduler_before_each_epoch():
    """'before_epoch' (cake-lab: scheduler.step() at the top of each epoch) gives every epoch the rate 'after_epoch'
    gives the next one: its decays come one epoch earlier."""
    from types import SimpleNamespace

    from toolkit.attacks.dfme import DFMEAttack
    from toolkit.models.generators import dfme_generator
    from toolkit.models.registry import build_model
    from toolkit.schemas import load_spec

    cfg = resolve(load_spec({"kind": "threat", "attack": "dfme", "victim": "v", "budget": 1})["dfme"], "canonical")
    clone, generator = build_model("lenet5_fifth", (1, 32, 32), 10), dfme_generator(8, (1, 32, 32), ngf=8)

    def per_epoch(order):
        attack = DFMEAttack(SimpleNamespace(budget=2_000_000), clone, generator, {**cfg, "scheduler_step": order},
                            [0.13], [0.31])
        per = cfg["epoch_itrs"] * cfg["d_iter"]
        return attack.epochs, [attack.opt_s.mtk_schedule(e * per) for e in range(attack.epochs)]

    epochs, before = per_epoch("before_epoch")
    _, after = per_epoch("after_epoch")
    assert epochs == 23 and cfg["scheduler_step"] == "before_epoch"  # the default is the reference's
    assert before[:-1] == after[1:] and before != after
    milestones = [int(f * epochs) for f in cfg["lr_steps"]]  # cake-lab: [2, 6, 11] for 2M on MNIST
    assert [e for e in range(1, epochs) if before[e] < before[e - 1]] == [m - 1 for m in milestones]
