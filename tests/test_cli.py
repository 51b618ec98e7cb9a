import json

from click.testing import CliRunner

from cli.main import main


def test_help_everywhere():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for command in main.commands:
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, command


def test_models_and_datasets_json():
    runner = CliRunner()
    models = json.loads(runner.invoke(main, ["models", "--json"]).output)
    assert "resnet18_8x" in [m["name"] for m in models]
    datasets = json.loads(runner.invoke(main, ["datasets", "--json"]).output)
    assert set(datasets) >= {"mnist", "fashion_mnist", "cifar10", "cifar100", "npz"}


def test_train_target_unknown_architecture_exits_2(tmp_path, cli_env):
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"kind": "target", "dataset": {"name": "mnist", "limit": 2000, "val_size": 100},
                                "model": {"architecture": "lenet7"}}))
    result = CliRunner().invoke(main, ["train-target", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [  # the file and the JSON path, before anything is built
        f"{spec}: $.model.architecture: unknown architecture 'lenet7' (did you mean 'lenet5'?); known: " + ", ".join(
            __import__("toolkit.models", fromlist=["x"]).available_architectures())]


def test_train_target_missing_spec_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["train-target", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and result.stderr.strip() == f"{tmp_path / 'none.json'}: file not found"
