"""Attacks end to end: DFME learns, DFMS-HL runs on hard labels, and every attack resumes with its query count."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from toolkit.artifacts import ModelDeployable
from toolkit.attacks.dfme import DFMEAttack, resolve
from toolkit.attacks.dfms_hl import class_diversity_loss
from toolkit.attacks.extract import extract
from toolkit.attacks.knockoff import KnockoffAttack
from toolkit.attacks.state import AttackState
from toolkit.data import Split
from toolkit.models import build_model
from toolkit.models.generators import dfme_generator
from toolkit.oracle import Oracle
from toolkit.schemas import load_spec

SHAPE = (1, 32, 32)


class Crash(Exception):
    """Stands in for a kill: raised by the victim before it answers the n-th request."""


class CrashingVictim:
    def __init__(self, victim, crash_at_call):
        self.victim, self.calls, self.crash_at_call = victim, 0, crash_at_call
        self.input_shape, self.num_classes, self.card = victim.input_shape, victim.num_classes, victim.card

    def predict_proba(self, x):
        self.calls += 1
        if self.calls == self.crash_at_call:
            raise Crash()
        return self.victim.predict_proba(x)


def random_victim():
    import keras

    keras.utils.set_random_seed(1)
    card = {"dataset": {"input_shape": list(SHAPE), "num_classes": 10}}
    return ModelDeployable(build_model("lenet5_fifth", SHAPE, 10, [0.13], [0.31]), card)


def dfme_parts(victim, budget, ledger=None):
    import keras

    keras.utils.set_random_seed(0)
    spec = load_spec({"kind": "threat", "attack": "dfme", "victim": "x",
                      "dfme": {"batch_size": 16, "ngf": 8, "nz": 16}}, kind="threat")
    cfg = resolve(spec["dfme"], "canonical")
    clone = build_model("lenet5_fifth", SHAPE, 10, [0.13], [0.31], name="clone")
    return DFMEAttack(Oracle(victim, budget, ledger=ledger, accept_out_of_range=True), clone,
                      dfme_generator(16, SHAPE, 8), cfg, [0.13], [0.31])


def test_tiny_dfme_beats_chance(tmp_path, cli_env, mnist_victim):
    spec = {"kind": "threat", "name": "d", "attack": "dfme", "victim": str(mnist_victim), "budget": 20000,
            "clone": {"architecture": "lenet5"}, "progress_every": 5000,
            "dfme": {"batch_size": 64, "ngf": 16, "nz": 32, "lr_G": 1e-3, "lr_S": 0.01,
                     "schedule_budget": 2_000_000}}  # the start of a paper-budget run: cake-lab's milestones for
    # a 20k budget would all be 0 and, stepped before the first epoch, cut every rate by 0.3^3 from the start
    result = extract(spec, out=tmp_path / "run")
    assert result["queries_used"] <= 20000
    assert result["clone_test_acc"] > 0.3, result["curve"]  # chance is 0.1; measured 0.55 (lr_S 0.1 stalls here)
    assert [p["queries"] for p in result["curve"]] == sorted(p["queries"] for p in result["curve"])
    assert all(0 <= p["attacker_check_agreement"] <= 1 for p in result["curve"])


@pytest.mark.parametrize("crash_at_call", [6 * 2 + 1, 6 * 2 + 4])  # 6 requests per iteration: 3rd one starts / mid-way
def test_dfme_resume_continues_the_query_count(tmp_path, crash_at_call):
    victim = random_victim()
    cost = 16 * (2 + 5)  # one request of 32 (gradient estimate), five of 16 (clone steps)
    budget = 5 * cost

    reference = dfme_parts(victim, budget)
    reference.run()

    state = AttackState(tmp_path, "fp")
    state.clock -= 1000.0  # the first run's wall clock: as if it had started 1000 s ago
    first = dfme_parts(CrashingVictim(victim, crash_at_call), budget, ledger=state.ledger)
    with pytest.raises(Crash):
        first.run(state=state, checkpoint_every=cost)
    spent_before_crash = first.oracle.queries_used
    state = AttackState(tmp_path, "fp")  # a fresh process: what it knows of the first run is in the checkpoint
    resumed = dfme_parts(victim, budget, ledger=state.ledger)  # fresh models: everything comes from the checkpoint
    resumed.run(state=state, checkpoint_every=cost)
    lost = spent_before_crash - 2 * cost
    assert resumed.oracle.queries_used <= budget
    if lost == 0:  # killed right after a checkpoint: the resumed run is the uninterrupted run
        assert resumed.oracle.queries_used == reference.oracle.queries_used == budget
        for a, b in zip(resumed.clone.get_weights(), reference.clone.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:  # queries answered after the last checkpoint were paid for: they stay counted, one iteration fewer
        assert lost == 32 + 2 * 16
        assert resumed.oracle.queries_used == budget - cost + lost
    assert resumed.oracle.queries_lost == lost  # the record says how much of the budget a restart wasted
    assert 1000.0 < state.seconds() < 1000.0 + 120  # wall time up to the last checkpoint carried over


def test_knockoff_resume_after_a_crash(tmp_path, mnist):
    victim = random_victim()
    pool = Split(mnist.val.x[:600], mnist.val.y[:600])
    spec = load_spec({"kind": "threat", "attack": "knockoff", "victim": "x",
                      "knockoff": {"protocol": "rounds", "rounds": 3, "epochs": 3, "query_batch": 100,
                                   "check_fraction": 0.05}}, kind="threat")

    def attack(v, state):
        import keras

        keras.utils.set_random_seed(0)
        clone = build_model("lenet5_fifth", SHAPE, 10, [0.13], [0.31], name="clone")
        return KnockoffAttack(Oracle(v, 600, ledger=state.ledger if state else None), clone, pool,
                              spec["knockoff"], seed=0)

    reference = attack(victim, None).run()
    state = AttackState(tmp_path, "fp")
    with pytest.raises(Crash):
        attack(CrashingVictim(victim, crash_at_call=3), state).run(state)  # inside round 2, after round 1 saved
    resumed_attack = attack(victim, state)
    resumed = resumed_attack.run(state)
    assert resumed_attack.oracle.queries_used == 600
    assert [p["queries"] for p in resumed["curve"]] == [p["queries"] for p in reference["curve"]] == [200, 400, 600]
    assert resumed["curve"][-1]["attacker_check_agreement"] == pytest.approx(
        reference["curve"][-1]["attacker_check_agreement"], abs=1e-6)
    # killed inside round 2, after a request was paid for and before any checkpoint kept it: the lost queries stay
    # spent, so the last round shrinks to what is left and the run still finishes within the budget
    state = AttackState(tmp_path / "mid", "fp")
    with pytest.raises(Crash):
        attack(CrashingVictim(victim, crash_at_call=4), state).run(state)
    resumed_attack = attack(victim, state)
    resumed = resumed_attack.run(state)
    assert resumed_attack.oracle.queries_used == 600 and resumed_attack.oracle.queries_lost == 100
    assert [p["queries"] for p in resumed["curve"]] == [200, 500, 600]  # paid for, the lost 100 included
    assert resumed["curve"][-1]["transfer_set"] == 500 - 25  # 500 answers held (100 never learned), 5 % checked


@pytest.mark.parametrize("policy,protocol", [("random", "reference"), ("adaptive", "rounds")])
def test_knockoff_killed_mid_collection_finishes_within_the_budget(tmp_path, mnist, policy, protocol):
    """A kill while queries are being collected (checkpoints every 200 queries): the re-run resumes from the last
    checkpoint, the 100 answers paid for after it stay spent and are recorded as lost, the budget holds."""
    victim = random_victim()
    pool = Split(mnist.val.x[:900], mnist.val.y[:900])
    spec = load_spec({"kind": "threat", "attack": "knockoff", "victim": "x",
                      "knockoff": {"policy": policy, "protocol": protocol, "rounds": 2, "epochs": 2,
                                   "query_batch": 100}}, kind="threat")

    def attack(v, state):
        import keras

        keras.utils.set_random_seed(0)
        clone = build_model("lenet5_fifth", SHAPE, 10, [0.13], [0.31], name="clone")
        return KnockoffAttack(Oracle(v, 600, ledger=state.ledger), clone, pool, spec["knockoff"], seed=0)

    state = AttackState(tmp_path, "fp")
    with pytest.raises(Crash):
        attack(CrashingVictim(victim, crash_at_call=5 if protocol == "rounds" else 4), state).run(state, 200)
    resumed = attack(victim, state)
    out = resumed.run(state, 200)
    assert resumed.oracle.queries_used == 600 and resumed.oracle.queries_lost == 100
    assert out["curve"][-1]["queries"] == 600 and out["curve"][-1]["transfer_set"] == 500


def test_class_diversity_loss_is_minimal_for_an_even_batch():
    k = 10
    even = torch.eye(k) * 20  # one confident answer per class
    collapsed = torch.zeros(k, k)
    collapsed[:, 3] = 20
    assert float(class_diversity_loss(even)) == pytest.approx(-np.log(k), abs=1e-4)
    assert float(class_diversity_loss(collapsed)) == pytest.approx(0.0, abs=1e-4)


def dfms_spec(victim, budget=900):
    return {"kind": "threat", "name": "h", "attack": "dfms-hl", "victim": str(victim), "budget": budget,
            "oracle": {"output": "hard"}, "clone": {"architecture": "lenet5_fifth"},
            "progress_every": 128, "checkpoint_every": 128,
            "dfms_hl": {"proxy_size": 256, "nz": 16, "ngf": 8, "ndf": 8, "gan_epochs": 1, "gan_batch_size": 32,
                        "init_generated": 64, "init_epochs": 1, "divgan_epochs": 1, "divgan_samples": 64,
                        "divgan_clone_epochs": 1, "alt_batch_size": 32}}


def test_dfms_hl_runs_on_hard_labels_and_resumes(tmp_path, cli_env, mnist_victim, monkeypatch):
    import toolkit.attacks.extract as extract_module
    from toolkit.artifacts import load_deployable

    seen = []
    real_query = Oracle.query

    def spy(self, x):
        answer = real_query(self, x)
        seen.append(answer)
        return answer

    monkeypatch.setattr(Oracle, "query", spy)
    crash = {"at": 14}  # stage 4: 256 proxy + 64 + 64 labelled in 2 requests... then alternate steps

    def crashing_loader(path):
        return CrashingVictim(load_deployable(path), crash["at"])

    monkeypatch.setattr(extract_module, "load_deployable", crashing_loader)
    with pytest.raises(Crash):
        extract(dfms_spec(mnist_victim), out=tmp_path / "run")
    spent = json.loads((tmp_path / "run" / "checkpoint" / "queries.json").read_text())["queries_used"]
    assert spent > 384  # the crash came in the alternating stage
    crash["at"] = 0
    result = extract(dfms_spec(mnist_victim), out=tmp_path / "run")
    assert all(a.ndim == 1 and a.dtype == torch.int64 for a in seen)  # hard labels only, never probabilities
    assert spent <= result["queries_used"] <= 900
    assert 900 - result["queries_used"] < 32
    assert result["queries_lost_to_restarts"] > 0  # answered after the last checkpoint, paid for, recorded
    stages = [p["stage"] for p in result["curve"]]
    assert stages[:2] == ["init", "divgan_label"] and stages[-1] == "alternate"


def test_dry_run_proves_a_paper_budget_spec(tmp_path, cli_env, mnist_victim):
    result = CliRunner().invoke(main, ["extract", "specs/threats/mnist-dfme.json", "--victim", str(mnist_victim),
                                       "--dry-run", "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["queries_used"] == 2 * 256 * 7
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["dry_run"] and record["spec"]["budget"] == 2 * 256 * 7


def test_checkpoint_of_another_spec_is_refused(tmp_path, cli_env, mnist_victim):
    spec = dfms_spec(mnist_victim, budget=400)
    spec["dfms_hl"]["alt_batch_size"] = 8
    extract(spec, out=tmp_path / "run")
    spec["seed"] = 3
    path = tmp_path / "t.json"
    path.write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["extract", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "checkpoint of a different threat spec" in result.stderr
    result = CliRunner().invoke(main, ["extract", str(path), "--out", str(tmp_path / "run"), "--force"])
    assert result.exit_code == 0, result.output


def test_dfms_hl_stage4_schedule_is_torchs_cosine_with_the_reference_warmup():
    """val-iisc stage 4: SGD 0.01, CosineAnnealingLR(T_max=niter) stepped per epoch, --warmup setting the rate to
    0.001 * epoch after each epoch < 10. Our per-epoch rates equal torch's own, run the same way."""
    from toolkit.training.optim import EpochSchedule

    niter = 40
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=niter)
    reference = []
    for epoch in range(niter):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
        if epoch < 10:
            for group in opt.param_groups:
                group["lr"] = 0.001 * epoch
    ours = EpochSchedule(0.01, 1, niter, "cosine", warmup_epochs=10, warmup_lr=0.001)
    np.testing.assert_allclose([ours.lr_at_epoch(e) for e in range(niter)], reference, rtol=1e-9, atol=1e-12)
    plain = EpochSchedule(0.01, 1, niter, "cosine")
    assert plain.lr_at_epoch(1) > 0.009 and ours.lr_at_epoch(1) == 0.0  # the reference's epoch at rate 0


def test_dfms_hl_batches_mix_sources_augment_and_keep_the_check_slice():
    """Stages 2-3 as the reference: each batch is 128 proxy + 102 generated images, pad-crop (+ flip) with mid-grey
    padding; stage 3 'scratch' trains on proxy + DivGAN labels only; check labels are never trained on."""
    from toolkit.attacks.dfms_hl import DIVGAN, INIT, PROXY, DFMSHLAttack
    from toolkit.schemas import load_spec

    cfg = load_spec({"kind": "threat", "attack": "dfms-hl", "victim": "v"})["dfms_hl"]
    assert (cfg["clone_batch_size"], cfg["clone_mix"], cfg["clone_augment"], cfg["divgan_epochs"],
            cfg["divgan_clone_from"], cfg["sample_mode"], cfg["alt_schedule"]) == (
        128, "per-source", "pad-crop-flip", 100, "scratch", "eval", "cosine")
    attack = DFMSHLAttack.__new__(DFMSHLAttack)
    attack.cfg, attack.check_fraction, attack.rng = cfg, 0.05, np.random.default_rng(0)
    attack.labelled_y = np.zeros(3000, np.int64)
    attack.labelled_source = np.repeat(np.array([PROXY, INIT, DIVGAN], np.int8), 1000)
    (proxy, b1), (generated, b2) = attack._parts([PROXY, DIVGAN])
    assert (b1, b2) == (128, 102)
    assert set(attack.labelled_source[proxy]) == {PROXY} and set(attack.labelled_source[generated]) == {DIVGAN}
    _, check = attack._split_check()
    assert len(check) == 150 and not set(check) & (set(proxy) | set(generated))
    attack.labelled_y = np.zeros(2000, np.int64)  # fewer labels (an earlier stage): its check slice is a prefix
    attack.labelled_source = attack.labelled_source[:2000]
    assert set(attack._split_check()[1]) <= set(check)
    x = torch.rand(64, 1, 32, 32)
    out = attack._augment_batch(x)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert bool(((out == 0.5).flatten(1).any(1)).float().mean() > 0.5)  # most images show some grey padding
    attack.cfg = {**cfg, "clone_augment": "none"}
    assert torch.equal(attack._augment_batch(x), x)
