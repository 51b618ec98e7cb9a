"""``mtk``: train targets, build defenses, run extraction attacks, validate specs.

Every command is a thin layer over ``toolkit``; user errors (bad spec, missing file, unknown name) print one line per
problem and exit with status 2.
"""

import functools
import json
import os
import pathlib
import sys

import click

# glibc returns freed buffers to the OS and re-faults them every step unless told otherwise; this must be set before
# the process starts (measured 1.3-2x on this CPU), so the CLI re-executes itself once with it.
_GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def _maybe_reexec():
    if (sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ
            and os.environ.get("MTK_NO_REEXEC") != "1" and sys.argv and os.path.exists(sys.argv[0])):
        env = {**os.environ, "GLIBC_TUNABLES": _GLIBC_TUNABLES, "MTK_NO_REEXEC": "1"}
        try:
            os.execve(sys.executable, [sys.executable, sys.argv[0], *sys.argv[1:]], env)
        except OSError:
            pass


class _Group(click.Group):
    """Turns UserError into one-line messages and exit status 2."""

    def invoke(self, ctx):
        from toolkit.errors import UserError

        try:
            return super().invoke(ctx)
        except UserError as exc:
            for line in str(exc).splitlines() or ["error"]:
                click.echo(f"mtk: error: {line}" if not line.startswith(("/", ".", "<")) and ": $" not in line
                           else line, err=True)
            ctx.exit(2)


def _common(func):
    """--verbose and --json on a command, applied before it runs."""

    @click.option("-v", "--verbose", is_flag=True, help="More detail (per-epoch logs, full cards).")
    @click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON result on stdout.")
    @functools.wraps(func)
    def wrapper(*args, verbose, as_json, **kwargs):
        from toolkit import progress

        if as_json:
            progress.set_enabled(False)
        return func(*args, verbose=verbose, as_json=as_json, **kwargs)

    return wrapper


def _data_root(func):
    return click.option("--data-root", type=click.Path(file_okay=False), default=None,
                        help="Data root (default: $MTK_DATA, else ~/.cache/mtk/data).")(func)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mtk")
def main():
    """mtk: defend classifiers against model extraction (MISLEADER, baselines) and run the attacks."""


@main.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_common
def validate_cmd(files, verbose, as_json):
    """Check spec files against their schemas; one line per problem."""
    from toolkit.errors import UserError
    from toolkit.schemas import read_json, validate

    problems = []
    for path in files:
        try:
            problems += validate(read_json(path), path)
        except UserError as exc:
            problems.append(str(exc))
    if as_json:
        click.echo(json.dumps({"files": list(files), "problems": problems}))
    elif not problems:
        click.echo(f"{len(files)} spec(s) valid")
    if problems:
        if not as_json:
            for line in problems:
                click.echo(line, err=True)
        sys.exit(2)


@main.command("schema")
@click.argument("kind", type=click.Choice(["target", "defense", "threat", "experiment"]))
def schema_cmd(kind):
    """Print the JSON Schema of a spec kind (every field with its description and default)."""
    from toolkit.schemas import get_schema

    click.echo(json.dumps(get_schema(kind), indent=2))


@main.command("models")
@_common
def models_cmd(verbose, as_json):
    """List the registered architectures."""
    from toolkit.models import available_architectures, get_architecture

    rows = [{"name": n, "doc": get_architecture(n).doc} for n in available_architectures()]
    if as_json:
        click.echo(json.dumps(rows))
    else:
        for row in rows:
            click.echo(f"{row['name']:18s} {row['doc']}")


@main.command("datasets")
@_common
def datasets_cmd(verbose, as_json):
    """List the registered datasets."""
    from toolkit.data import available_datasets

    names = available_datasets()
    click.echo(json.dumps(names) if as_json else "\n".join(names))


@main.command("train-target")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Artifact folder (default runs/targets/NAME).")
@click.option("--force", is_flag=True,
              help="Retrain even if the folder holds a finished target or a checkpoint of a different spec.")
@click.option("--dry-run", is_flag=True, help="Prove the path: one epoch of two steps, into NAME-dry-run.")
@_data_root
@_common
def train_target_cmd(spec, out, force, dry_run, data_root, verbose, as_json):
    """Train a target model from SPEC; re-running after a kill resumes from the last finished epoch."""
    from toolkit.training.target import train_target

    card = train_target(spec, out=out, data_root=data_root, force=force, dry_run=dry_run)
    _print_card(card, as_json, verbose)


@main.command("defend")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Defense folder (default runs/defenses/NAME).")
@click.option("--force", is_flag=True,
              help="Rebuild even if the folder holds a defense (or checkpoints) from a different spec.")
@click.option("--dry-run", is_flag=True,
              help="Prove the path: target and each member one epoch of two steps, into NAME-dry-run.")
@click.option("--member", "members", multiple=True,
              help="Train only this member (repeatable), e.g. one per process or machine; run without it to "
                   "assemble the ensemble.")
@_data_root
@_common
def defend_cmd(spec, out, force, dry_run, members, data_root, verbose, as_json):
    """Build the defense in SPEC (MISLEADER ensemble); resumes per member and per epoch after a kill."""
    from toolkit.defenses import defend

    card = defend(spec, out=out, data_root=data_root, force=force, dry_run=dry_run, only_members=members or None)
    if card is None:
        click.echo(f"trained member(s) {', '.join(members)}")
        return
    if as_json:
        click.echo(json.dumps(card if verbose else {"name": card["name"], "metrics": card["metrics"],
                                                    "members": {k: v["metrics"] for k, v in
                                                                card.get("members", {}).items()}}))
        return
    what = "ensemble" if card.get("members") else card.get("method", "defense")
    click.echo(f"{card['name']}: {what} test acc {card['metrics']['test_acc']:.4f}, "
               f"val acc {card['metrics']['val_acc']:.4f}, agreement with target "
               f"{card['metrics']['test_agreement_with_target']:.4f}")
    for name, member in card.get("members", {}).items():
        m = member["metrics"]
        click.echo(f"  {name:16s} test acc {m['test_acc']:.4f}  agreement {m['test_agreement_with_target']:.4f}")


@main.command("extract")
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.option("--attack", type=click.Choice(["dfme", "dfms-hl", "knockoff"]), help="Attack (overrides the spec).")
@click.option("--victim", help="Victim: an artifact folder (target, member or defense) or a live mtk serve URL.")
@click.option("--key", "api_key", default=None, help="API key for an http(s) victim (default: $MTK_API_KEY).")
@click.option("--clone", "clone_arch", help="Clone architecture.")
@click.option("--budget", type=int, help="Query budget.")
@click.option("--output", "oracle_output", type=click.Choice(["soft", "hard"]), help="What the API returns.")
@click.option("--seed", type=int, help="Attack seed.")
@click.option("--name", help="Run name (default: the spec's, or ATTACK-VICTIM-CLONE).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/attacks/NAME).")
@click.option("--force", is_flag=True, help="Discard a checkpoint written by a different spec instead of stopping.")
@click.option("--dry-run", is_flag=True, help="Spend only a couple of iterations' queries (tiny stages) into "
              "NAME-dry-run: proves a paper-budget spec starts and finishes.")
@_data_root
@_common
def extract_cmd(spec, attack, victim, api_key, clone_arch, budget, oracle_output, seed, name, out, force, dry_run,
                data_root, verbose, as_json):
    """Extract a clone of a victim through the black-box oracle: from a threat SPEC and/or options.

    Resumes from the run folder's checkpoint after a kill (the query count continues)."""
    from toolkit.attacks.extract import extract
    from toolkit.errors import UserError
    from toolkit.schemas import read_json

    data = read_json(spec) if spec else {"kind": "threat"}
    overrides = {"attack": attack, "victim": victim, "budget": budget, "seed": seed, "name": name}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if clone_arch:
        data["clone"] = {**data.get("clone", {}), "architecture": clone_arch}
    if oracle_output:
        data["oracle"] = {**data.get("oracle", {}), "output": oracle_output}
    if not spec:
        missing = [opt for opt, key in (("--attack", "attack"), ("--victim", "victim")) if key not in data]
        if missing:
            raise UserError(f"without a threat spec, {' and '.join(missing)} must be given")
        victim_label = pathlib.Path(data["victim"].split("://")[-1].replace(":", "-").rstrip("/")).name
        data.setdefault("name", f"{data['attack']}-{victim_label}-"
                                f"{data.get('clone', {}).get('architecture', 'lenet5')}")
    # errors name the spec file, unless the field at fault came from an option (then the option's value says it)
    source = spec if spec and victim is None else None
    result = extract(data, out=out, data_root=data_root, force=force, dry_run=dry_run, api_key=api_key,
                     source=source)
    if as_json:
        click.echo(json.dumps(result if verbose else {k: result[k] for k in (
            "attack", "victim", "clone_architecture", "queries_used", "clone_test_acc", "fidelity", "wall_seconds")}))
    else:
        click.echo(f"{result['attack']} on {result['victim']}: clone ({result['clone_architecture']}) test acc "
                   f"{result['clone_test_acc']:.4f}, fidelity "
                   f"{'not measured' if result['fidelity'] is None else format(result['fidelity'], '.4f')}, "
                   f"{result['queries_used']} queries, {result['wall_seconds']:.0f}s")


@main.command("extraction")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", default="results/extraction", show_default=True, help="Output path stem (.json, .md, .png).")
@_common
def extraction_cmd(runs, out, verbose, as_json):
    """Clone-accuracy table and accuracy-vs-queries plot from attack run folders (mtk extract outputs)."""
    from toolkit.experiments.report import write_extraction

    command = "mtk extraction " + " ".join(runs) + (f" --out {out}" if out != "results/extraction" else "")
    rows = write_extraction(runs, out, command)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in rows]))
    else:
        click.echo(pathlib.Path(out).with_suffix(".md").read_text())


@main.command("run")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--executor", type=click.Choice(["local", "ray"]), help="Where cells run (overrides the spec).")
@click.option("--address", default=None, help="Ray cluster address ('auto' for a running cluster).")
@click.option("--workers", type=int, default=None, help="Local parallel processes (overrides the spec).")
@_data_root
@_common
def run_cmd(spec, executor, address, workers, data_root, verbose, as_json):
    """Run an experiment grid: build missing defenses once, attack every cell without a record; resumable."""
    from toolkit.experiments.runner import run_experiment, status
    from toolkit.schemas import load_spec

    run_experiment(spec, data_root=data_root, executor=executor, address=address, workers=workers)
    state = status(load_spec(spec, kind="experiment"))
    click.echo(json.dumps(state) if as_json else f"{state['done']}/{state['cells']} cells recorded")


@main.command("status")
@click.argument("spec", type=click.Path(dir_okay=False))
@_common
def status_cmd(spec, verbose, as_json):
    """Cells of an experiment: done, running (claimed by a live process), started (resumable), left, and an ETA."""
    from toolkit.experiments.runner import status
    from toolkit.schemas import load_spec

    state = status(load_spec(spec, kind="experiment"))
    if as_json:
        click.echo(json.dumps(state))
        return
    eta = "" if state["eta_seconds"] is None else f", ETA {state['eta_seconds'] / 60:.0f} min"
    click.echo(f"{state['done']} done, {state['running']} running, {state['started']} started, {state['left']} left of "
               f"{state['cells']} cells{eta}; "
               f"{state['defenses_built']} of {state['defenses']} defenses built")


@main.command("report")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Output path stem (default results/NAME/report).")
@_common
def report_cmd(spec, out, verbose, as_json):
    """Paper-style tables (md, csv, json) and curves from an experiment's results store."""
    from toolkit.experiments.grid import expand, victim_name
    from toolkit.experiments.report import write_experiment_report
    from toolkit.experiments.runner import results_root
    from toolkit.experiments.store import ResultsStore
    from toolkit.schemas import load_spec

    loaded = load_spec(spec, kind="experiment")
    store = ResultsStore(results_root(loaded))
    out = out or str(results_root(loaded) / "report")
    rows = write_experiment_report(store, out, f"mtk report {spec}", loaded["description"] or loaded["name"],
                                   defense_folders=[victim_name(d) for d in loaded["defenses"]],
                                   cell_ids=[c["id"] for c in expand(loaded, spec)], clone_order=loaded["clones"])
    click.echo(json.dumps(rows) if as_json else pathlib.Path(out).with_suffix(".md").read_text())


@main.command("utility")
@click.argument("defenses", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", default="results/utility", show_default=True, help="Output path stem (.json and .md).")
@_common
def utility_cmd(defenses, out, verbose, as_json):
    """Utility table (paper Table 2 layout): target, each member and the ensemble of each defense folder."""
    from toolkit.experiments.report import write_utility

    command = "mtk utility " + " ".join(defenses) + (f" --out {out}" if out != "results/utility" else "")
    rows = write_utility(defenses, out, command)
    if as_json:
        click.echo(json.dumps(rows))
    else:
        click.echo(pathlib.Path(out).with_suffix(".md").read_text())


@main.command("serve")
@click.argument("artifact", type=click.Path(file_okay=False, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port.")
@click.option("--keys", "keys_path", default="runs/keys.sqlite", show_default=True,
              help="SQLite key database (mtk keys add ...).")
@click.option("--open", "open_access", is_flag=True, help="No API keys (local experiments only).")
@click.option("--output", type=click.Choice(["soft", "hard"]), default="soft", show_default=True,
              help="Answer with probabilities or the top-1 label only.")
@click.option("--max-batch", type=int, default=256, show_default=True, help="Rows per model call (dynamic batching).")
@click.option("--max-wait-ms", type=float, default=5.0, show_default=True,
              help="How long a request may wait for others to share its model call.")
@click.option("--max-rows", type=int, default=1024, show_default=True, help="Images per request at most.")
@click.option("--threads", type=int, default=1, show_default=True, help="Torch threads for the model.")
def serve_cmd(artifact, host, port, keys_path, open_access, output, max_batch, max_wait_ms, max_rows, threads):
    """Serve a saved defense (or target) as an ML API: predict, model card, health; OpenAPI docs at /docs."""
    from toolkit.serve.server import serve

    serve(artifact, host=host, port=port, keys_path=None if open_access else keys_path, output=output,
          max_batch=max_batch, max_wait_ms=max_wait_ms, max_rows=max_rows, threads=threads)


@main.group("keys")
def keys_group():
    """API keys of mtk serve: add (with a query budget and rate limit), list, revoke."""


def _keys_db(func):
    return click.option("--db", "db", default="runs/keys.sqlite", show_default=True,
                        help="SQLite key database.")(func)


@keys_group.command("add")
@click.option("--budget", type=int, required=True, help="Queries (images) this key may spend in total.")
@click.option("--rate", type=float, default=None, help="Queries per second at most (default: unlimited).")
@click.option("--name", default=None, help="Who the key is for.")
@_keys_db
def keys_add(budget, rate, name, db):
    """Create a key; its secret is printed once and stored only as a hash."""
    from toolkit.serve.keys import KeyStore

    pathlib.Path(db).parent.mkdir(parents=True, exist_ok=True)
    key_id, secret = KeyStore(db).add(budget, rate, name)
    click.echo(f"{secret}")
    click.echo(f"key {key_id}: budget {budget} queries" + (f", {rate:g} queries/s" if rate else "")
               + " (the line above is the secret: it is not stored)", err=True)


@keys_group.command("list")
@_keys_db
@_common
def keys_list(db, verbose, as_json):
    """Keys with budget, queries used, rate and state (never the secrets)."""
    from toolkit.serve.keys import KeyStore

    rows = KeyStore(db).list()
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        click.echo(f"{r['id']}  {r['name'] or '-':12}  used {r['used']}/{r['budget']}  rate "
                   f"{r['rate'] if r['rate'] else 'unlimited'}  {'REVOKED' if r['revoked'] else 'active'}")


@keys_group.command("usage")
@click.argument("key_id", required=False)
@_keys_db
@_common
def keys_usage(key_id, db, verbose, as_json):
    """The audit log: queries and requests per key and minute (inputs are never stored)."""
    import datetime

    from toolkit.serve.keys import KeyStore

    rows = KeyStore(db).usage(key_id)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        when = datetime.datetime.fromtimestamp(r["window"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{r['key_id']}  {when} UTC  {r['queries']} queries in {r['requests']} requests")


@keys_group.command("revoke")
@click.argument("key_id")
@_keys_db
def keys_revoke(key_id, db):
    """Revoke a key by id: its requests get 403 from then on."""
    from toolkit.serve.keys import KeyStore

    KeyStore(db).revoke(key_id)
    click.echo(f"key {key_id} revoked")


def _print_card(card, as_json, verbose):
    if as_json:
        click.echo(json.dumps(card if verbose else {k: card[k] for k in ("name", "kind", "metrics") if k in card}))
    else:
        m = card["metrics"]
        click.echo(f"{card['name']}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in m.items()))


def run():
    _maybe_reexec()
    main(prog_name="mtk")


if __name__ == "__main__":
    run()
