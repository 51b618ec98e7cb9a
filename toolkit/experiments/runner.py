"""``mtk run``: build what an experiment's cells need (each defense once), then attack every cell not yet recorded.

Run cell by cell (the local default), a defense is built just before its first cell, so a grid's first rows land
before its later defenses train; a process pool or Ray builds them all first.

Executors: ``local`` (this process, or a small process pool) and ``ray`` (one Ray task per cell with the CPU/GPU
share the spec asks for). Every executor runs the same ``run_cell`` and the driver alone writes records, so the store
looks the same whichever ran the cells. An interrupted cell resumes from its run folder's attack checkpoint.

Cell by cell, each cell is claimed first (``claims``), so several ``mtk run`` of one grid (two lanes on one machine,
or machines sharing ``runs/`` and ``results/``) split its cells, and a defense is built under a lock that the others
wait on. A pool or Ray driver claims nothing: run one of those per grid.
"""

import pathlib
import time

from toolkit import progress
from toolkit.errors import UserError
from toolkit.experiments import claims
from toolkit.experiments.grid import expand
from toolkit.experiments.store import ResultsStore
from toolkit.schemas import load_spec


def run_folder(spec, cell):
    return pathlib.Path("runs") / "experiments" / spec["name"] / cell["id"]


def run_cell(threat_spec, folder, data_root=None):
    """One attack run (resumable); returns its result dict. Importable by worker processes and Ray tasks."""
    from toolkit.attacks.extract import extract

    return extract(threat_spec, out=folder, data_root=data_root)


def prepare_defenses(spec, data_root=None):
    """Builds every target, defense or single defense member the grid names (each skipped when already built)."""
    for entry in spec["defenses"]:
        prepare_defense(entry, data_root)


def prepare_defense(entry, data_root=None):
    """Builds one ``defenses`` entry given as a spec file (skipped when already built); checks that an artifact
    folder exists."""
    from toolkit.defenses import defend
    from toolkit.experiments.grid import split_entry
    from toolkit.schemas import read_json
    from toolkit.training.target import train_target

    path, member = split_entry(entry)
    if path.suffix != ".json":
        if not (path / "card.json").exists():
            raise UserError(f"$.defenses: {entry}: not an artifact folder (no card.json) and not a spec")
    elif not path.exists():
        raise UserError(f"$.defenses: {path}: file not found")
    elif read_json(path).get("kind") == "target":
        train_target(str(path), data_root=data_root)
    else:
        defend(str(path), data_root=data_root, only_members=[member] if member else None)


def status(spec, store=None):
    """Cells done / running (claimed by a live process) / started (checkpoint present, idle) / left, defenses built,
    and an ETA: each cell left is costed at the mean wall time of finished cells of the same threat and budget (else of
    all finished cells), shared among the processes running cells now."""
    from toolkit.experiments.grid import victim_name

    store = store or ResultsStore(results_root(spec))
    cells = expand(spec)
    done = [c for c in cells if store.done(c["id"])]
    finished = {c["id"] for c in done}
    left = [c for c in cells if c["id"] not in finished]
    running = [c for c in left if claims.holder(run_folder(spec, c))]
    busy = {c["id"] for c in running}
    started = [c for c in left if c["id"] not in busy and (run_folder(spec, c) / "checkpoint" / "attack.npz").exists()]
    walls = {}
    for c in done:
        walls.setdefault((c["threat"], c["budget"]), []).append(store.get(c["id"])["result"]["wall_seconds"])
    every = [w for ws in walls.values() for w in ws]
    mean = lambda ws: sum(ws) / len(ws)  # noqa: E731
    eta = sum(mean(walls.get((c["threat"], c["budget"])) or every) for c in left) if every else None
    eta = eta / max(1, len(running)) if eta else eta
    built = [e for e in spec["defenses"] if (pathlib.Path(victim_name(e)) / "card.json").exists()]
    return {"cells": len(cells), "done": len(done), "running": len(running), "started": len(started),
            "left": len(left),
            "eta_seconds": eta if left else 0.0, "defenses": len(spec["defenses"]), "defenses_built": len(built)}


def results_root(spec):
    return pathlib.Path("results") / spec["name"]


def run_experiment(spec, data_root=None, executor=None, address=None, workers=None):
    """Runs every cell of ``spec`` (dict or path) that has no record yet; returns the store."""
    source = spec if isinstance(spec, str) else "<experiment>"
    spec = load_spec(spec, kind="experiment")
    cells = expand(spec, str(source))
    store = ResultsStore(results_root(spec))
    # seed-first, then threat by threat: a partial run already covers the first threat's rows once
    order = lambda c: (spec["seeds"].index(c["seed"]), spec["threats"].index(c["threat"]))  # noqa: E731
    todo = sorted((c for c in cells if not store.done(c["id"])), key=order)
    progress.log(f"[{spec['name']}] {len(cells)} cells, {len(cells) - len(todo)} recorded, {len(todo)} to run")
    ex = dict(spec["executor"])
    ex["name"] = executor or ex["name"]
    ex["workers"] = workers or ex["workers"]
    sequential = ex["name"] == "local" and ex["workers"] == 1
    if not spec["threats"] or (todo and not sequential):
        # no threats: the experiment builds its defenses (a utility table) only; parallel workers need all of them
        prepare_defenses(spec, data_root)
    if not todo:
        return store
    if ex["name"] == "ray":
        _run_ray(spec, todo, store, ex, address, data_root)
    elif ex["workers"] > 1:
        _run_pool(spec, todo, store, ex["workers"], data_root)
    else:
        _run_sequential(spec, todo, store, data_root)
    return store


def _run_sequential(spec, todo, store, data_root):
    """Cell by cell in this process, each claimed first; a cell another process holds or has finished is passed."""
    from toolkit.experiments.grid import victim_name

    start, built, finished = time.time(), set(), 0
    for i, cell in enumerate(todo):
        folder = run_folder(spec, cell)
        with claims.claim(folder) as mine:
            if not mine or store.done(cell["id"]):
                progress.log(f"[{spec['name']}] cell {i + 1}/{len(todo)} {cell['id']}: "
                             f"{'recorded' if mine else 'running in another process'}; passed")
                continue
            if cell["defense"] not in built:  # built before its first cell: early rows land before later ones train
                lock = pathlib.Path(victim_name(cell["defense"]) + ".build")
                with claims.claim(lock, wait=True):  # another lane building it: wait, then find it built
                    prepare_defense(cell["defense"], data_root)
                built.add(cell["defense"])
            progress.log(f"[{spec['name']}] cell {i + 1}/{len(todo)} {cell['id']}: {cell['attack']} on "
                         f"{cell['defense']} clone {cell['clone']} budget {cell['budget']} seed {cell['seed']}")
            result = run_cell(cell["threat_spec"], folder, data_root)
            store.put(cell, result, folder)
        finished += 1
        _eta(spec, start, finished, len(todo) - i - 1 + finished)


def _eta(spec, start, finished, total):
    per = (time.time() - start) / finished
    progress.log(f"[{spec['name']}] {finished}/{total} cells this run; ETA {per * (total - finished) / 60:.0f} min")


def _run_pool(spec, todo, store, workers, data_root):
    from concurrent.futures import ProcessPoolExecutor, as_completed

    start = time.time()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_cell, c["threat_spec"], run_folder(spec, c), data_root): c for c in todo}
        for i, future in enumerate(as_completed(futures)):
            cell = futures[future]
            store.put(cell, future.result(), run_folder(spec, cell))
            _eta(spec, start, i + 1, len(todo))


def _run_ray(spec, todo, store, ex, address, data_root):
    try:
        import ray
    except ImportError:
        raise UserError("the ray executor needs Ray: pip install -e '.[ray]'") from None
    from toolkit.data.sources import resolve_data_root

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_cpus=ex["cpus_per_run"], num_gpus=ex["gpus_per_run"])(run_cell)
    cwd, root = pathlib.Path.cwd(), str(resolve_data_root(data_root).absolute())

    def absolute(threat):  # Ray workers need not share the driver's working directory
        return {**threat, "victim": str(cwd / threat["victim"])}

    pending = {task.remote(absolute(c["threat_spec"]), str(cwd / run_folder(spec, c)), root): c for c in todo}
    start, finished = time.time(), 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready[0])
        store.put(cell, ray.get(ready[0]), run_folder(spec, cell))
        finished += 1
        _eta(spec, start, finished, len(todo))
