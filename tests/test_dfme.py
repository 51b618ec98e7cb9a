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
