"""Experiment grids: expansion, the results store, skip/resume on re-run, status and the report."""

import json

import pytest
from click.testing import CliRunner

from cli.main import main


def write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def tiny_experiment(tmp_path, cli_env, mnist_victim, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threat = write(tmp_path / "ko.json", {
        "kind": "threat", "attack": "knockoff", "victim": "unused", "budget": 600,
        "knockoff": {"rounds": 2, "epochs": 2, "query_batch": 100, "surrogate": {"splits": ["val"]}}})
    return write(tmp_path / "exp.json", {
        "kind": "experiment", "name": "tiny", "defenses": [str(mnist_victim)], "threats": [threat],
        "clones": ["lenet5_fifth"], "budgets": [400, 600], "seeds": [0, 1],
        "overrides": [{"match": {"budget": 400}, "set": {"knockoff.rounds": 1}}]})


def test_grid_runs_records_skips_and_reports(tiny_experiment, tmp_path, monkeypatch):
    from toolkit.experiments import runner
    from toolkit.experiments.grid import expand
    from toolkit.schemas import load_spec

    cells = expand(load_spec(tiny_experiment, kind="experiment"))
    assert len(cells) == 4 and len({c["id"] for c in cells}) == 4
    assert {c["threat_spec"]["knockoff"]["rounds"] for c in cells if c["budget"] == 400} == {1}
    result = CliRunner().invoke(main, ["run", tiny_experiment, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["done"] == 4
    records = sorted((tmp_path / "results" / "tiny" / "records").glob("*.json"))
    assert len(records) == 4
    first = json.loads(records[0].read_text())
    assert first["result"]["queries_used"] == first["cell"]["budget"]

    # A finished cell is never re-run; a lost record (a kill before it was written) is the only work left.
    records[0].unlink()
    calls = []
    real = runner.run_cell
    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: calls.append(a) or real(*a, **k))
    status = CliRunner().invoke(main, ["status", tiny_experiment, "--json"])
    assert json.loads(status.output)["left"] == 1
    assert CliRunner().invoke(main, ["run", tiny_experiment]).exit_code == 0
    assert len(calls) == 1

    report = CliRunner().invoke(main, ["report", tiny_experiment])
    assert report.exit_code == 0, report.output
    md = (tmp_path / "results" / "tiny" / "report.md").read_text()
    assert "budget 400 queries" in md and "budget 600 queries" in md and " ± " in md
    rows = json.loads((tmp_path / "results" / "tiny" / "report.json").read_text())["rows"]
    assert all(r["seeds"] == 2 for r in rows)
    assert (tmp_path / "results" / "tiny" / "report.csv").exists()


def test_bad_experiment_is_one_line(tmp_path, cli_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "exp.json", {"kind": "experiment", "defenses": ["x"], "threats": ["missing.json"]})
    result = CliRunner().invoke(main, ["run", path])
    assert result.exit_code == 2 and "missing.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ray_executor_fills_the_same_store(tiny_experiment, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")

    spec = json.loads((tmp_path / "exp.json").read_text())
    tiny_experiment = write(tmp_path / "exp.json", {**spec, "budgets": [400], "seeds": [0]})  # one cell: one worker
    real_init = ray.init

    def small_local_cluster(**kwargs):  # a one-CPU local Ray instance: cheap enough for a 2-core CI machine
        kwargs.pop("address", None)
        return real_init(num_cpus=1, include_dashboard=False, **kwargs)

    monkeypatch.setattr(ray, "init", small_local_cluster)
    try:
        result = CliRunner().invoke(main, ["run", tiny_experiment, "--executor", "ray", "--json"])
        assert result.exit_code == 0, result.output
    finally:
        ray.shutdown()
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "tiny" / "records").glob("*.json")]
    assert len(records) == 1
    assert all(r["result"]["queries_used"] == r["cell"]["budget"] for r in records)
    assert all((tmp_path / r["run_folder"] / "clone.keras").exists() for r in records)
