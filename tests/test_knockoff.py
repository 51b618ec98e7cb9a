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
