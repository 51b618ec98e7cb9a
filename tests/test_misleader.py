import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from toolkit.artifacts import load_deployable, read_card
from toolkit.data.augment import AttackerAugmentation
from toolkit.defenses import defend
from toolkit.defenses.losses import JS_BOUND, adversary_divergence
from toolkit.defenses.misleader import MisleaderMember
from toolkit.models import build_model
from toolkit.training.optim import make_optimizer
from toolkit.training.target import train_target

DATA = {"name": "mnist", "limit": 6000, "val_size": 1000}


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory, data_root):
    import os

    os.environ["MTK_DATA"] = str(data_root)
    folder = tmp_path_factory.mktemp("target")
    train_target({"kind": "target", "name": "tiny-target", "dataset": DATA, "model": {"architecture": "lenet5"},
                  "train": {"epochs": 1, "batch_size": 128, "optimizer": {"name": "adam", "lr": 0.002}}},
                 out=folder)
    return folder


def _member_cfg(**overrides):
    from toolkit.schemas import load_spec

    spec = load_spec({"kind": "defense", "target": "x", "members": [{"architecture": "lenet5_fifth", **overrides}]})
    return spec["members"][0]


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def test_member_loss_equals_hand_computation():
    torch.manual_seed(0)
    cfg = _member_cfg(**{"lambda": 0.7, "temperature": 3.0, "alpha": 0.4})
    d, a, t = (build_model(n, (1, 32, 32), 10) for n in ("lenet5_fifth", "lenet5_half", "lenet5"))
    member = MisleaderMember(d, a, t, cfg)
    x, x_att, y = torch.rand(16, 1, 32, 32), torch.rand(16, 1, 32, 32), torch.randint(0, 10, (16,))
    terms = member.losses_on(x, y, x_att)

    dl, tl = d(x, training=True).detach().numpy(), t(x, training=False).detach().numpy()
    dal, al = d(x_att, training=True).detach().numpy(), a(x_att, training=True).detach().numpy()
    T, alpha, lam = 3.0, 0.4, 0.7
    pt, pd = _softmax(tl / T), _softmax(dl / T)
    kd = T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(pd)), 1))
    ce = -np.mean(np.log(_softmax(dl)[np.arange(16), y.numpy()]))
    qd, qa = _softmax(dal), _softmax(al)
    adv = np.mean(np.sum(qd * (np.log(qd) - np.log(qa)), 1))
    expected = alpha * kd + (1 - alpha) * ce - lam * adv
    value = {k: float(v.detach()) for k, v in terms.items() if k != "d_logits"}
    assert value["kd"] == pytest.approx(kd, rel=1e-4)
    assert value["ce"] == pytest.approx(ce, rel=1e-4)
    assert value["adv"] == pytest.approx(adv, rel=1e-4)
    assert value["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # Gradients reach the member only: the attacker's outputs are detached in the member loss.
    terms["loss"].backward()
    assert all(v.value.grad is not None for v in d.trainable_variables)
    assert all(v.value.grad is None for v in a.trainable_variables)


def test_bounded_adversary_terms():
    d, a = torch.randn(64, 10) * 20, torch.randn(64, 10) * 20
    assert float(adversary_divergence(d, a, "kl")) > 5
    assert float(adversary_divergence(d, a, "kl_clamped", clamp=2.0)) <= 2.0 + 1e-6
    assert 0 <= float(adversary_divergence(d, a, "js")) <= JS_BOUND + 1e-6
    assert float(adversary_divergence(d, d.clone(), "js")) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("mode,expected_steps", [("accumulate", 1), ("steps", 3)])
def test_attacker_modes(mode, expected_steps):
    cfg = _member_cfg(attacker={"steps": 3, "mode": mode})
    d, a, t = (build_model("lenet5_fifth", (1, 32, 32), 10) for _ in range(3))
    member = MisleaderMember(d, a, t, cfg)
    member.compile(d_optimizer=make_optimizer(cfg["optimizer"]), a_optimizer=make_optimizer(cfg["attacker"]["optimizer"]))
    x = torch.rand(8, 1, 32, 32)
    metrics = member.train_step(((x, x), torch.randint(0, 10, (8,))))
    assert int(member.a_optimizer.iterations.numpy()) == expected_steps
    assert int(member.d_optimizer.iterations.numpy()) == 1
    assert set(metrics) >= {"loss", "kd", "ce", "adv", "atk"}


def test_augmentation_draws_differ_across_one_batch():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32).expand(128, 3, 32, 32).contiguous()
    off = {k: {"enabled": False} for k in ("resized_crop", "horizontal_flip", "color_jitter", "grayscale", "affine")}
    for op in ("resized_crop", "color_jitter", "affine"):
        out = AttackerAugmentation({**off, op: {"enabled": True}})(x, training=True)
        distinct = {tuple(np.round(out[i].flatten()[::97].numpy(), 5)) for i in range(128)}
        assert len(distinct) > 120, op
    gray = AttackerAugmentation({**off, "grayscale": {"enabled": True, "p": 0.5}})(x, training=True)
    is_gray = torch.tensor([torch.allclose(g[0], g[1]) and torch.allclose(g[1], g[2]) for g in gray])
    assert 30 < int(is_gray.sum()) < 98
    full = AttackerAugmentation()(x, training=True)
    assert full.shape == x.shape and full.device == x.device and 0 <= float(full.min()) and float(full.max()) <= 1
    assert torch.equal(AttackerAugmentation()(x, training=False), x)


def test_affine_identity_parameters_leave_images_unchanged():
    x = torch.rand(4, 1, 32, 32)
    off = {k: {"enabled": False} for k in ("resized_crop", "horizontal_flip", "color_jitter", "grayscale")}
    same = AttackerAugmentation({**off, "affine": {"degrees": 0, "translate": 0, "scale": [1, 1]}})(x)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)


def _defense_spec(target, lam, members=("lenet5_fifth",), epochs=2, seed=0):
    return {"kind": "defense", "name": f"tiny-{lam}", "target": str(target), "seed": seed,
            "augment": {"horizontal_flip": {"enabled": False}, "grayscale": {"enabled": False}},
            "member_defaults": {"lambda": lam, "epochs": epochs, "batch_size": 128,
                                "attacker": {"steps": 2, "optimizer": {"lr": 0.05}}},
            "members": [{"architecture": m} for m in members]}


def _disagreement_on_augmented(folder, data_root):
    from toolkit.artifacts import load_keras_model
    from toolkit.data import load_dataset

    card = read_card(folder / "members" / "lenet5_fifth")
    data = load_dataset(DATA, data_root)
    torch.manual_seed(123)
    x = AttackerAugmentation(_defense_spec("x", 0)["augment"])(torch.as_tensor(data.val.x[:512]).float() / 255)
    d = load_keras_model(folder / "members" / "lenet5_fifth" / card["deployable"]["file"])
    a = load_keras_model(folder / "members" / "lenet5_fifth" / "attacker.keras")
    pd, pa = (torch.softmax(m(x, training=False), 1).detach() for m in (d, a))
    return float((pd * (pd.log() - pa.log())).sum(1).mean())


def test_lambda_pushes_member_away_from_its_simulated_attacker(tiny_target, tmp_path, data_root):
    base = defend(_defense_spec(tiny_target, 0.0), out=tmp_path / "lam0")
    misled = defend(_defense_spec(tiny_target, 1.0), out=tmp_path / "lam1")
    kl0 = _disagreement_on_augmented(tmp_path / "lam0", data_root)
    kl1 = _disagreement_on_augmented(tmp_path / "lam1", data_root)
    assert kl1 > 1.3 * kl0
    # Utility stays: the member is still a usable classifier.
    assert misled["members"]["lenet5_fifth"]["metrics"]["val_acc"] > 0.6
    assert base["members"]["lenet5_fifth"]["metrics"]["val_acc"] > 0.6


def test_saved_ensemble_reloads_and_answers_identically(tiny_target, tmp_path, mnist):
    spec = _defense_spec(tiny_target, 0.3, members=("lenet5_fifth", "lenet5_half"), epochs=1)
    card = defend(spec, out=tmp_path / "ens")
    assert set(card["members"]) == {"lenet5_fifth", "lenet5_half"}
    for member in card["members"].values():
        assert {"val_acc", "test_acc", "test_agreement_with_target"} <= set(member["metrics"])
    ensemble = load_deployable(tmp_path / "ens")
    x = mnist.test.x[:300]
    first, second = ensemble.predict_proba(x), load_deployable(tmp_path / "ens").predict_proba(x)
    assert torch.equal(first, second)
    np.testing.assert_allclose(first.sum(1).numpy(), 1, atol=1e-5)
    members = [load_deployable(tmp_path / "ens" / "members" / n) for n in ("lenet5_fifth", "lenet5_half")]
    mean = (members[0].predict_proba(x) + members[1].predict_proba(x)) / 2
    torch.testing.assert_close(first, mean)
    # Target, member and ensemble all load through the same call.
    assert load_deployable(tiny_target).predict_proba(x).shape == (300, 10)
    # A second run reuses the finished members and ensemble.
    again = defend(spec, out=tmp_path / "ens")
    assert again["metrics"] == card["metrics"]


def test_bad_member_spec_is_one_line_exit_2(tiny_target, tmp_path):
    spec = _defense_spec(tiny_target, 0.1, members=("lenet5", "lenet9"))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["defend", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: $.members[1].architecture: unknown architecture 'lenet9'")
    spec["members"][0]["temperature"] = -1
    path.write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["defend", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{path}: $.members[0].temperature: -1 is less than or equal to the minimum of 0"


def test_defend_killed_inside_an_epoch_resumes_and_finishes(tiny_target, tmp_path, data_root):
    """kill -9 inside a member's second epoch; the same command then resumes after epoch 1 and builds the defense."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = tmp_path / "d.json"
    spec.write_text(json.dumps(_defense_spec(tiny_target, 0.3, epochs=3)))
    out = tmp_path / "killed"
    env = {**os.environ, "MTK_NO_REEXEC": "1", "MTK_PROGRESS": "0", "MTK_DATA": str(data_root)}
    command = [sys.executable, "-m", "cli.main", "defend", str(spec), "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "members" / "lenet5_fifth" / "checkpoint"
    start = time.time()
    while not any(checkpoint.glob("*.npz")) and time.time() < start + 180 and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(min(0.5, (time.time() - start) / 4))  # inside epoch 2 (or 3), never past the end
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(checkpoint.glob("*.npz")) and not (out / "card.json").exists(), "killed between epochs 1 and 3"
    resumed = subprocess.run(command, env={**env, "MTK_PROGRESS": "1"}, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    card = read_card(out / "members" / "lenet5_fifth")
    assert [h["epoch"] for h in card["history"]] == [1, 2, 3]
    assert (out / "card.json").exists()
