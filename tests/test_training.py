import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from click.testing import CliRunner

from cli.main import main
from toolkit.artifacts import load_deployable, read_card
from toolkit.training.target import train_target


def _spec(tmp_path, **train):
    spec = {"kind": "target", "name": "tiny", "seed": 1,
            "dataset": {"name": "mnist", "limit": 22000, "val_size": 2000},
            "model": {"architecture": "lenet5"},
            "train": {"epochs": 2, "batch_size": 128, "optimizer": {"name": "adam", "lr": 0.001}, **train}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_small_mnist_training_reaches_95_percent_and_reloads(tmp_path, cli_env, mnist):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train-target", str(_spec(tmp_path)), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["metrics"]["test_acc"] >= 0.95
    card = read_card(out)
    assert card["dataset"]["input_shape"] == [1, 32, 32] and card["architecture"]["trainable_params"] == 61706
    assert card["normalization"]["mean"] == [0.1307] and len(card["spec_hash"]) == 64
    assert {"keras", "torch", "torchvision"} <= set(card["versions"])
    assert [h["epoch"] for h in card["history"]] == [1, 2]
    assert card["metrics"]["selected_epoch"] == max(card["history"], key=lambda h: h["val_acc"])["epoch"]
    # The saved model reloads through the one deployable call and answers the reported test accuracy.
    victim = load_deployable(out)
    proba = victim.predict_proba(mnist.test.x)
    assert proba.shape == (10_000, 10) and not proba.requires_grad
    np.testing.assert_allclose(proba.sum(1).numpy(), 1.0, atol=1e-5)
    assert abs((proba.argmax(1).numpy() == mnist.test.y).mean() - card["metrics"]["test_acc"]) < 1e-9
    # It also loads in a fresh interpreter (custom layers registered by importing the toolkit alone).
    code = ("import sys, toolkit; from toolkit.artifacts import load_deployable; "
            "print(load_deployable(sys.argv[1]).predict_proba(__import__('torch').zeros(2, 1, 32, 32)).shape)")
    fresh = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0 and "torch.Size([2, 10])" in fresh.stdout, fresh.stderr
    # A finished artifact is reused, not retrained; a changed spec is refused.
    again = CliRunner().invoke(main, ["train-target", str(_spec(tmp_path)), "--out", str(out), "--json"])
    assert json.loads(again.output)["metrics"] == summary["metrics"]
    changed = CliRunner().invoke(main, ["train-target", str(_spec(tmp_path, epochs=3)), "--out", str(out)])
    assert changed.exit_code == 2 and "different spec" in changed.stderr


def test_resume_after_kill_continues_and_matches_uninterrupted(tmp_path, cli_env):
    spec = _spec(tmp_path, epochs=3, batch_size=256)
    killed = tmp_path / "killed"
    env = {**os.environ, "MTK_NO_REEXEC": "1", "MTK_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "train-target", str(spec), "--out", str(killed)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = killed / "checkpoint" / "tiny.state.npz"
    start = time.time()
    deadline = start + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(min(0.5, (time.time() - start) / 3))  # into epoch 2: inside an epoch, not at its checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (killed / "card.json").exists(), "the run must die between epochs 1 and 3"

    resumed = subprocess.run([sys.executable, "-m", "cli.main", "train-target", str(spec), "--out", str(killed)],
                             env={**env, "MTK_PROGRESS": "1"}, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    after = read_card(killed)
    assert [h["epoch"] for h in after["history"]] == [1, 2, 3]

    straight = train_target(str(spec), out=tmp_path / "straight")
    assert [h["val_acc"] for h in after["history"]] == [h["val_acc"] for h in straight["history"]]
    assert after["metrics"]["test_acc"] == straight["metrics"]["test_acc"]


def test_loss_scaler_is_exact_and_skips_overflowing_steps():
    import keras
    import torch

    from toolkit.training.optim import LossScaler, make_optimizer

    def one_step(scaler, poison=False):
        keras.utils.set_random_seed(0)
        v = keras.Variable(np.ones(4, np.float32))
        opt = make_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9})
        opt.build([v])
        loss = (v.value * torch.arange(4.0)).sum()
        scaler.backward(loss * (float("inf") if poison else 1.0))
        applied = scaler.step(opt, [v])
        return applied, v.numpy()

    _, plain = one_step(LossScaler(enabled=False))
    applied, scaled = one_step(LossScaler(enabled=True, init_scale=2.0 ** 16))
    assert applied and np.array_equal(plain, scaled)  # power-of-two scaling: bit-identical update
    scaler = LossScaler(enabled=True, init_scale=2.0 ** 16)
    applied, poisoned = one_step(scaler, poison=True)
    assert not applied and np.array_equal(poisoned, np.ones(4)) and scaler.scale == 2.0 ** 15
