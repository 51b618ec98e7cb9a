import json

from click.testing import CliRunner

from cli.main import main


def test_knockoff_in_distribution_small_budget(tmp_path, cli_env, mnist_victim):
    victim = mnist_victim
    spec = {"kind": "threat", "name": "ko", "attack": "knockoff", "victim": str(victim), "budget": 4000, "seed": 0,
            "clone": {"architecture": "lenet5_half"},
            "knockoff": {"protocol": "rounds", "rounds": 2, "epochs": 6, "check_fraction": 0.05,
                         "optimizer": {"lr": 0.05, "momentum": 0.9},
                         "surrogate": {"splits": ["val", "holdout", "train"]}}}
    path = tmp_path / "ko.json"
    path.write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["extract", str(path), "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["queries_used"] == 4000
    assert out["clone_test_acc"] >= 0.85, out
    assert out["fidelity"] >= 0.85
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [p["queries"] for p in record["curve"]] == [2000, 4000]
    assert all(0 <= p["attacker_check_agreement"] <= 1 for p in record["curve"])
    assert (tmp_path / "run" / "clone.keras").exists()


def test_unknown_attack_is_a_clear_error(tmp_path, cli_env):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"kind": "threat", "attack": "jbda", "victim": str(tmp_path)}))
    result = CliRunner().invoke(main, ["extract", str(path)])
    assert result.exit_code == 2
    assert "$.attack" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_victim_is_a_clear_error(tmp_path, cli_env):
    result = CliRunner().invoke(main, ["extract", "--attack", "knockoff", "--victim", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{tmp_path / 'none'}: not an mtk artifact (no card.json)"


def test_dfme_against_a_hard_label_api_is_a_clear_error(tmp_path, cli_env):
    result = CliRunner().invoke(main, ["extract", "--attack", "dfme", "--victim", str(tmp_path), "--output", "hard"])
    assert result.exit_code == 2 and "$.oracle.output" in result.stderr


def test_check_slice_is_fixed_per_answer_and_never_trained_on():
    """Every 1/f-th answer by arrival is held back for good: the round-1 check answers stay check answers in round 2,
    and no check answer ever enters the training set."""
    import numpy as np
    import torch

    from toolkit.attacks.knockoff import KnockoffAttack

    attack = KnockoffAttack(None, None, None, {"check_fraction": 0.1})
    attack.queried, attack.answers = [np.arange(1000, 1050)], [torch.rand(50, 10)]
    train1, _, check1, _ = attack._transfer_set()
    attack.queried.append(np.arange(2000, 2050))
    attack.answers.append(torch.rand(50, 10))
    train2, y2, check2, ycheck2 = attack._transfer_set()
    assert len(check1) == 5 and len(check2) == 10 and len(train2) == len(y2) == 90 and len(ycheck2) == 10
    assert set(check1) <= set(check2)
    assert not set(check2) & set(train2) and not set(check1) & set(train1)
    attack.cfg["check_fraction"] = 0.0  # the reference: no check slice, everything is trained on
    assert len(attack._transfer_set()[0]) == 100 and len(attack._transfer_set()[2]) == 0


def test_the_schedule_follows_global_epochs_so_its_decay_is_reached(mnist_victim):
    """Reference protocol (spend the budget, then N epochs) and rounds: the learning rate of epoch e is the schedule's
    rate at e, whatever the transfer set's size, so a milestone inside the run is reached."""
    from toolkit.artifacts import dataset_config, load_deployable
    from toolkit.attacks.knockoff import KnockoffAttack
    from toolkit.data.registry import load_dataset
    from toolkit.models import build_model
    from toolkit.oracle import Oracle
    from toolkit.schemas import load_spec

    victim = load_deployable(mnist_victim)
    data = load_dataset(dataset_config(victim.card))
    pool = data.val.take(slice(0, 400))
    rates = {}
    for protocol in ("reference", "rounds"):
        cfg = load_spec({"kind": "threat", "attack": "knockoff", "victim": "v",
                         "knockoff": {"protocol": protocol, "rounds": 2, "epochs": 6, "batch_size": 100,
                                      "schedule": {"name": "multistep", "milestones": [3], "gamma": 0.1},
                                      "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.5}}})["knockoff"]
        clone = build_model("lenet5_fifth", (1, 32, 32), 10, data.mean, data.std)
        attack = KnockoffAttack(Oracle(victim, 200), clone, pool, cfg)
        seen = rates[protocol] = []
        train_epoch = attack._train_epoch

        def spy(opt, *args, seen=seen, train_epoch=train_epoch):
            seen.append(round(float(opt.mtk_schedule(opt.iterations)), 6))
            train_epoch(opt, *args)

        attack._train_epoch = spy
        out = attack.run()
        assert out["queries_used"] == 200
    assert rates["reference"] == [0.01] * 3 + [0.001] * 3
    assert rates["rounds"] == [0.01] * 3 + [0.001] * 3  # 3 epochs per round, the decay at global epoch 3
