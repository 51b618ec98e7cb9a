import json

from click.testing import CliRunner

from cli.main import main
from toolkit.training.target import train_target


def test_knockoff_in_distribution_small_budget(tmp_path, cli_env):
    victim = tmp_path / "victim"
    card = train_target({"kind": "target", "name": "v", "dataset": {"name": "mnist", "val_size": 2000, "limit": 12000},
                         "model": {"architecture": "lenet5"},
                         "train": {"epochs": 2, "batch_size": 128, "optimizer": {"name": "adam", "lr": 0.001}}},
                        out=victim)
    spec = {"kind": "threat", "name": "ko", "attack": "knockoff", "victim": str(victim), "budget": 4000, "seed": 0,
            "clone": {"architecture": "lenet5_half"},
            "knockoff": {"rounds": 2, "epochs": 6, "optimizer": {"lr": 0.05, "momentum": 0.9},
                         "surrogate": {"splits": ["val", "holdout", "train"]}}}
    path = tmp_path / "ko.json"
    path.write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["extract", str(path), "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["queries_used"] == 4000
    assert out["clone_test_acc"] >= 0.85, out
    assert out["fidelity"] >= 0.85 and card["metrics"]["test_acc"] > 0.9
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [p["queries"] for p in record["curve"]] == [2000, 4000]
    assert all(0 <= p["attacker_check_agreement"] <= 1 for p in record["curve"])
    assert (tmp_path / "run" / "clone.keras").exists()


def test_unimplemented_attack_is_a_clear_error(tmp_path, cli_env):
    result = CliRunner().invoke(main, ["extract", "--attack", "dfms-hl", "--victim", str(tmp_path)])
    assert result.exit_code == 2
    assert "attack 'dfms-hl' is not implemented in this version" in result.stderr


def test_missing_victim_is_a_clear_error(tmp_path, cli_env):
    result = CliRunner().invoke(main, ["extract", "--attack", "knockoff", "--victim", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{tmp_path / 'none'}: not an mtk artifact (no card.json)"
