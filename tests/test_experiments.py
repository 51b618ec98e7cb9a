"""Experiment grids: expansion, the results store, skip/resume on re-run, status and the report."""

import json
import pathlib

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

    # A record of a cell the edited grid no longer has is left out of the report, and counted.
    stale = json.loads(records[1].read_text())
    stale["id"], stale["result"]["clone_test_acc"] = "0" * 12, 0.0
    (records[1].parent / f"{stale['id']}.json").write_text(json.dumps(stale))
    report = CliRunner().invoke(main, ["report", tiny_experiment])
    assert report.exit_code == 0, report.output
    md = (tmp_path / "results" / "tiny" / "report.md").read_text()
    assert "budget 400 queries" in md and "budget 600 queries" in md and " ± " in md
    assert "from 4 records of the grid's 4 cells (1 records of cells no longer in the grid left out)" in md
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


def _record(i, victim, kind, method, clone, acc, seed, budget=1000, curve=((500, 0.2),)):
    metrics = {"val_acc": 0.9, "test_acc": 0.95, "test_agreement_with_target": 0.97}
    return {"id": f"c{i}", "cell": {"attack": "dfme", "preset": "canonical", "budget": budget, "clone": clone,
                                    "seed": seed},
            "threat_spec": {"victim": f"runs/{victim}", "oracle": {"output": "soft"}},
            "result": {"dataset": "mnist", "victim_method": method, "victim_kind": kind, "victim_name": victim,
                       "victim_metrics": metrics, "clone_test_acc": acc, "fidelity": acc, "victim_test_acc": 0.95,
                       "queries_used": budget, "wall_seconds": 60.0,
                       "curve": [{"queries": q, "clone_test_acc": a} for q, a in curve]}}


def test_report_layout_paper_figures_and_plots_from_the_store_alone(tmp_path):
    """The report needs only the records (no run folders): paper layout, paper figures, Table 2, Fig. 2 and Fig. 3."""
    from toolkit.experiments.report import budget_curves, write_experiment_report
    from toolkit.experiments.store import ResultsStore

    store = ResultsStore(tmp_path / "results" / "x")
    records = [_record(0, "mnist-lenet5", "target", "undefended", "lenet5", 0.60, 0),
               _record(1, "mnist-lenet5", "target", "undefended", "lenet5", 0.80, 1),
               _record(2, "mnist-misleader", "defense", "misleader", "lenet5", 0.30, 0),
               _record(3, "mnist-misleader", "defense", "misleader", "lenet5_half", 0.25, 0)]
    records += [_record(10 + i, m, "member", "member", c, 0.1 * (i + 1), 0)
                for i, (m, c) in enumerate([(m, c) for m in ("lenet5", "lenet5_half") for c in ("lenet5", "lenet5_half")])]
    truncated = _record(20, "mnist-lenet5", "target", "undefended", "lenet5", 0.65, 0)  # first 1000 of a 2M schedule
    truncated["threat_spec"]["dfme"] = {"schedule_budget": 2_000_000}
    records.append(truncated)
    for r, lost in zip(records[:2], (0, 1792)):  # the misleader rows' records predate the count
        r["result"]["queries_lost_to_restarts"] = lost
    for r in records:
        store.records.mkdir(parents=True, exist_ok=True)
        (store.records / f"{r['id']}.json").write_text(json.dumps(r))
    rows = write_experiment_report(store, tmp_path / "rep", "mtk report x", "title")
    md = (tmp_path / "rep.md").read_text()
    undefended = next(r for r in rows if r["method"] == "undefended")
    assert undefended["seeds"] == 2 and abs(undefended["clone_acc_mean"] - 70.0) < 1e-9  # the truncated run apart
    assert "budget 1,000 queries (the first 1,000 of a 2,000,000-query schedule)" in md
    assert "| undefended (mnist-lenet5) | 65.00 ± 0.00 [1] |" in md
    assert abs(undefended["clone_acc_std"] - 14.142135623730951) < 1e-6
    assert undefended["queries_lost"] == 1792 and "| 1,792 |" in md
    assert next(r for r in rows if r["method"] == "misleader")["queries_lost"] is None
    assert "| defense (victim) | lenet5 | lenet5_half |" in md  # clones are columns, defenses rows
    assert "| misleader (mnist-misleader) | 30.00 ± 0.00 [1] (paper 11.81 ± 0.64) | 25.00 ± 0.00 [1] (paper 11.80" in md
    assert md.index("undefended (mnist-lenet5)") < md.index("misleader (mnist-misleader)")
    assert "## Utility (Table 2 analogue)" in md and "| 98.93 |" in md  # the paper's MISLEADER MNIST utility
    assert (tmp_path / "rep-budget.png").exists() and (tmp_path / "rep-matrix.png").exists()
    curves = budget_curves(store.all())
    panel = curves[("mnist", "dfme", "canonical", "lenet5")]
    assert panel["undefended (mnist-lenet5)"] == [(500, 20.0), (1000, 70.0)]
    assert panel["undefended (mnist-lenet5), 2,000,000-query schedule"] == [(500, 20.0), (1000, 65.0)]


def test_the_released_flaw_splits_a_presets_table():
    """One preset run with and without the released prob-as-logit flaw: two tables and two curves, never averaged."""
    from toolkit.experiments.report import budget_curves, experiment_rows

    honest, flawed = (_record(i, "mnist-lenet5", "target", "undefended", "lenet5", acc, 0)
                      for i, acc in ((0, 0.9), (1, 0.1)))
    for r, flaw in ((honest, False), (flawed, True)):
        r["cell"]["preset"] = "misleader-released"
        r["threat_spec"]["dfme"] = {"released_prob_as_logit": flaw}
    rows = experiment_rows([honest, flawed])
    assert sorted((r["preset"], r["seeds"], r["clone_acc_mean"]) for r in rows) == [
        ("misleader-released", 1, 90.0), ("misleader-released (prob-as-logit flaw)", 1, 10.0)]
    assert {k[2] for k in budget_curves([honest, flawed])} == {"misleader-released",
                                                               "misleader-released (prob-as-logit flaw)"}


def test_a_column_whose_undefended_clone_is_at_chance_ranks_nothing(tmp_path):
    """The validity rule: undefended clone within 2 points of chance (MNIST: 10 %) -> "attack has not started: no
    ranking" and every cell of that column marked; a column whose undefended clone learned is ranked as usual. A
    table run with the released flaw says so under its heading."""
    from toolkit.experiments.report import write_experiment_report
    from toolkit.experiments.store import ResultsStore

    store = ResultsStore(tmp_path / "results" / "x")
    records = [_record(0, "mnist-lenet5", "target", "undefended", "lenet5", 0.1150, 0),  # 1.5 points above chance
               _record(1, "mnist-misleader", "defense", "misleader", "lenet5", 0.0974, 0),
               _record(2, "mnist-lenet5", "target", "undefended", "lenet5_half", 0.1250, 0),  # 2.5 points: started
               _record(3, "mnist-misleader", "defense", "misleader", "lenet5_half", 0.0980, 0)]
    flawed = [_record(4 + i, *r, 0) for i, r in enumerate([("mnist-lenet5", "target", "undefended", "lenet5", 0.5),
                                                           ("mnist-misleader", "defense", "misleader", "lenet5", 0.3)])]
    for r in flawed:
        r["threat_spec"]["dfme"] = {"released_prob_as_logit": True}
    store.records.mkdir(parents=True, exist_ok=True)
    for r in records + flawed:
        (store.records / f"{r['id']}.json").write_text(json.dumps(r))
    rows = write_experiment_report(store, tmp_path / "rep", "mtk report x", "title")
    md = (tmp_path / "rep.md").read_text()
    honest = md[:md.index("(prob-as-logit flaw) preset")]
    assert "Column lenet5: attack has not started: no ranking" in honest
    assert "lenet5_half: attack has not started" not in honest
    assert "| undefended (mnist-lenet5) | 11.50 ± 0.00 [1] (not started) | 12.50 ± 0.00 [1] |" in md
    assert "| misleader (mnist-misleader) | 9.74 ± 0.00 [1] (not started) (paper 11.81 ± 0.64) | 9.80 ± 0.00 [1] (paper" \
        in md
    assert {(r["clone"], r["attack_started"]) for r in rows if "flaw" not in r["preset"]} == {
        ("lenet5", False), ("lenet5_half", True)}
    flaw_table = md[md.index("(prob-as-logit flaw) preset"):]
    assert flaw_table.index("with the released evaluation's flaw") < flaw_table.index("| defense (victim) |")
    assert "not started" not in flaw_table.split("## Details")[0]


def test_a_cell_is_new_when_a_default_of_its_attack_changes(tmp_path):
    """Cell ids hash the threat with its defaults filled: spelling a default out keeps the id (and its record), a
    different query space is a different cell, and another attack's block does not touch a DFME cell."""
    from toolkit.experiments.grid import expand

    def cell_id(dfme=None, knockoff=None):
        threat = {"kind": "threat", "attack": "dfme", "victim": "unused"}
        threat.update({k: v for k, v in (("dfme", dfme), ("knockoff", knockoff)) if v is not None})
        path = write(tmp_path / "t.json", threat)
        exp = {"kind": "experiment", "name": "g", "defenses": ["runs/targets/v"], "threats": [path], "budgets": [1000],
               "seeds": [0], "clones": ["lenet5"]}
        from toolkit.schemas import load_spec

        return expand(load_spec(exp, kind="experiment"))[0]["id"]

    base = cell_id()
    assert cell_id({"query_space": "reference"}) == base
    assert cell_id({"query_space": "unit"}) != base
    assert cell_id(knockoff={"epochs": 7}) == base


def test_rows_follow_the_papers_order():
    """Defense rows read as in the paper's Table 1 (undefended, RandP, P-poison, GRAD, MeCo, ACT, DNF, MISLEADER last);
    defenses the paper's Table 1 lacks sit before MISLEADER, unknown ones alphabetically."""
    from toolkit.experiments.report import method_rank

    methods = ["misleader", "act", "zeta", "randp", "dnf", "undefended", "grad", "edm", "p-poison", "meco", "alpha"]
    assert sorted(methods, key=method_rank) == ["undefended", "randp", "p-poison", "grad", "meco", "act", "dnf", "edm",
                                                "alpha", "zeta", "misleader"]


def test_entries_name_targets_defenses_and_single_members(tmp_path, monkeypatch):
    """Target specs, defense specs and spec#MEMBER entries deploy where they build; a grid without threats only
    builds its defenses (Table 2); an unknown member is a one-line error."""
    from toolkit.experiments import runner
    from toolkit.experiments.grid import expand, victim_name
    from toolkit.schemas import load_spec

    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
    assert victim_name("specs/targets/mnist-lenet5.json") == "runs/targets/mnist-lenet5"
    assert victim_name("specs/mnist-misleader.json") == "runs/defenses/mnist-misleader"
    assert victim_name("specs/mnist-misleader.json#lenet5_half") == "runs/defenses/mnist-misleader/members/lenet5_half"
    cells = expand(load_spec("specs/experiments/cpu-fig2-mnist.json", kind="experiment"))
    assert len(cells) == 9 and {c["threat_spec"]["victim"] for c in cells} == {
        f"runs/defenses/mnist-misleader/members/{m}" for m in ("lenet5", "lenet5_half", "lenet5_fifth")}

    built = []
    monkeypatch.setattr("toolkit.training.target.train_target", lambda spec, **k: built.append(("target", spec)))
    monkeypatch.setattr("toolkit.defenses.defend", lambda spec, **k: built.append(("defense", spec, k["only_members"])))
    spec = load_spec({"kind": "experiment", "name": "t2", "defenses": [
        "specs/targets/mnist-lenet5.json", "specs/mnist-misleader.json", "specs/mnist-misleader.json#lenet5"]},
        kind="experiment")
    monkeypatch.setattr(runner, "results_root", lambda s: tmp_path / "results" / s["name"])
    runner.run_experiment(spec)
    assert built == [("target", "specs/targets/mnist-lenet5.json"), ("defense", "specs/mnist-misleader.json", None),
                     ("defense", "specs/mnist-misleader.json", ["lenet5"])]


def test_sequential_run_builds_each_defense_just_before_its_first_cell(tmp_path, monkeypatch):
    """A long local grid records the undefended rows before a later defense starts training (each built once)."""
    from toolkit.experiments import runner
    from toolkit.schemas import load_spec

    repo = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    events = []
    monkeypatch.setattr("toolkit.training.target.train_target", lambda spec, **k: events.append(("build", spec)))
    monkeypatch.setattr("toolkit.defenses.defend", lambda spec, **k: events.append(("build", spec)))
    monkeypatch.setattr(runner, "run_cell", lambda threat, folder, data_root=None: events.append(
        ("attack", threat["victim"], threat["seed"])) or {"queries_used": 1, "wall_seconds": 1.0})
    monkeypatch.setattr(runner, "results_root", lambda s: tmp_path / "results" / s["name"])
    target, misleader = str(repo / "specs/targets/mnist-lenet5.json"), str(repo / "specs/mnist-misleader.json")
    spec = load_spec({"kind": "experiment", "name": "lazy", "defenses": [target, misleader],
                      "threats": [str(repo / "specs/threats/mnist-knockoff.json")], "seeds": [0, 1]},
                     kind="experiment")
    runner.run_experiment(spec)
    assert events == [("build", target), ("attack", "runs/targets/mnist-lenet5", 0),
                      ("build", misleader), ("attack", "runs/defenses/mnist-misleader", 0),
                      ("attack", "runs/targets/mnist-lenet5", 1), ("attack", "runs/defenses/mnist-misleader", 1)]
    assert len(list((tmp_path / "results" / "lazy" / "records").glob("*.json"))) == 4


def test_status_costs_each_cell_left_by_its_own_threat(tmp_path, monkeypatch):
    """A grid mixing a 1-minute attack and a 1-hour one: the ETA prices each cell left by finished cells like it."""
    from toolkit.experiments import runner
    from toolkit.experiments.grid import expand
    from toolkit.experiments.store import ResultsStore
    from toolkit.schemas import load_spec

    repo = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    spec = load_spec({"kind": "experiment", "name": "eta", "defenses": [str(repo / "specs/targets/mnist-lenet5.json")],
                      "threats": [str(repo / "specs/threats/mnist-knockoff.json"),
                                  str(repo / "specs/threats/mnist-dfme.json")], "seeds": [0, 1, 2]}, kind="experiment")
    store = ResultsStore(runner.results_root(spec))
    for cell in expand(spec):
        if cell["seed"] == 0:
            store.put(cell, {"wall_seconds": 60.0 if cell["attack"] == "knockoff" else 3600.0}, "x")
    state = runner.status(spec)
    assert (state["done"], state["left"], state["cells"]) == (2, 4, 6)
    assert state["eta_seconds"] == 2 * 60.0 + 2 * 3600.0
    assert (state["defenses"], state["defenses_built"]) == (1, 0)
    (tmp_path / "runs" / "targets" / "mnist-lenet5").mkdir(parents=True)
    (tmp_path / "runs" / "targets" / "mnist-lenet5" / "card.json").write_text("{}")
    assert runner.status(spec)["defenses_built"] == 1


def test_a_grid_without_attacks_reports_utility_from_cards(tmp_path, mnist_victim):
    from toolkit.experiments.report import write_experiment_report
    from toolkit.experiments.store import ResultsStore

    write_experiment_report(ResultsStore(tmp_path / "empty"), tmp_path / "t2", "mtk report t2", "t2",
                            defense_folders=[str(mnist_victim)], cell_ids=[])
    md = (tmp_path / "t2.md").read_text()
    assert "from the cards of the grid's built defenses (a grid without attacks)" in md
    assert "Clone test accuracy" not in md and "| mnist | undefended (" in md


def test_two_runs_of_one_grid_split_its_cells(tmp_path, monkeypatch):
    """A cell another process has claimed is passed (not run twice) and counted as running; a claim dies with its
    holder, so a killed lane's cell is taken by the next run."""
    import subprocess
    import sys

    from toolkit.experiments import claims, runner
    from toolkit.experiments.grid import expand
    from toolkit.schemas import load_spec

    repo = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "targets" / "mnist-lenet5").mkdir(parents=True)
    (tmp_path / "runs" / "targets" / "mnist-lenet5" / "card.json").write_text("{}")
    spec = load_spec({"kind": "experiment", "name": "lanes", "defenses": ["runs/targets/mnist-lenet5"],
                      "threats": [str(repo / "specs/threats/mnist-knockoff.json")], "seeds": [0, 1, 2]},
                     kind="experiment")
    ran = []
    monkeypatch.setattr(runner, "run_cell", lambda threat, folder, data_root=None: ran.append(threat["seed"]) or {
        "queries_used": 1, "wall_seconds": 1.0})
    cells = sorted(expand(spec), key=lambda c: c["seed"])
    other = runner.run_folder(spec, cells[1])
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from toolkit.experiments import claims\n"
        "with claims.claim(sys.argv[2]) as mine:\n    print(mine, flush=True); time.sleep(60)"), str(repo), str(other)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert claims.holder(other)["pid"] == holder.pid
        assert runner.status(spec)["running"] == 1
        runner.run_experiment(spec)
        assert ran == [0, 2]
        state = runner.status(spec)
        assert (state["done"], state["running"], state["left"], state["eta_seconds"]) == (2, 1, 1, 1.0)
    finally:
        holder.kill()
        holder.wait()
    assert claims.holder(other) is None and runner.status(spec)["running"] == 0
    runner.run_experiment(spec)  # the killed holder's claim file is left behind and needs no cleaning
    assert ran == [0, 2, 1]


def test_mtk_run_killed_inside_a_cell_finishes_on_the_next_run(tiny_experiment, tmp_path, data_root):
    """kill -9 while a later cell is running: the next `mtk run` passes the finished cells, re-runs the killed one
    from its checkpoint and ends with every cell recorded once, none over its budget."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "MTK_NO_REEXEC": "1", "MTK_PROGRESS": "0", "MTK_DATA": str(data_root),
           "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "cli.main", "run", tiny_experiment]
    records = tmp_path / "results" / "tiny" / "records"
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.time()
    while len(list(records.glob("*.json"))) < 1 and time.time() < start + 300 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(min(1.0, (time.time() - start) / 4))  # inside the next cell
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(records.glob("*.json")))
    assert 1 <= done_before < 4, "the kill must land between the first and the last cell"
    again = subprocess.run(command + ["--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    recs = [json.loads(p.read_text()) for p in records.glob("*.json")]
    assert len(recs) == 4 and all(r["result"]["queries_used"] <= r["cell"]["budget"] for r in recs)
