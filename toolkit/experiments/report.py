"""Paper-style tables from artifact cards (utility now; clone-accuracy tables join with the attacks)."""

import json
import pathlib

from toolkit.artifacts import read_card
from toolkit.training.checkpoint import atomic_write_bytes

PAPER_UTILITY = {"mnist": 98.93, "cifar10": 95.46, "cifar100": 78.15}  # paper Table 2, MISLEADER row


def utility_rows(defense_folders):
    """Target, each member and the ensemble of each defense: val/test accuracy and agreement with the target."""
    rows = []
    for folder in defense_folders:
        folder = pathlib.Path(folder)
        card = read_card(folder)
        dataset = card["dataset"]["name"]
        target = read_card(card["target"]["folder"])
        tm = target["metrics"]
        base = {"defense": card["name"], "dataset": dataset, "dry_run": bool(card.get("dry_run"))}
        rows.append({**base, "model": f"target ({target['architecture']['architecture']})", "role": "target",
                     "val_acc": tm["val_acc"], "test_acc": tm["test_acc"], "agreement_with_target": 1.0})
        for name, member in card.get("members", {}).items():
            m = member["metrics"]
            rows.append({**base, "model": name, "role": "member", "val_acc": m["val_acc"], "test_acc": m["test_acc"],
                         "agreement_with_target": m["test_agreement_with_target"],
                         "lambda": member["lambda"], "temperature": member["temperature"], "alpha": member["alpha"]})
        m = card["metrics"]
        rows.append({**base, "model": f"{card['method']} ensemble" if card.get("members") else card["method"],
                     "role": "defense", "val_acc": m["val_acc"], "test_acc": m["test_acc"],
                     "agreement_with_target": m["test_agreement_with_target"],
                     "paper_test_acc": PAPER_UTILITY.get(dataset) if card["method"] == "misleader" else None})
    return rows


def write_utility(defense_folders, out, command):
    rows = utility_rows(defense_folders)
    out = pathlib.Path(out)
    record = {"table": "utility (paper Table 2 analogue)", "command": command, "rows": rows}
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
    lines = ["# Utility: target vs members vs ensemble", "", f"Produced by `{command}`.",
             "Accuracies in %, on each dataset's test set; model selection used the validation split only.", "",
             "| dataset | defense | model | lambda / T / alpha | val acc | test acc | agreement with target | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hp = f"{r['lambda']} / {r['temperature']} / {r['alpha']}" if r["role"] == "member" else ""
        paper = f"{r['paper_test_acc']:.2f}" if r.get("paper_test_acc") else ""
        name = r["defense"] + (" (dry run)" if r["dry_run"] else "")
        lines.append(f"| {r['dataset']} | {name} | {r['model']} | {hp} | {100 * r['val_acc']:.2f} | "
                     f"{100 * r['test_acc']:.2f} | {100 * r['agreement_with_target']:.2f} | {paper} |")
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    return rows


# The paper's clone accuracies (%, mean and std over 5 seeds), keyed (attack, dataset, defense method, clone
# architecture); clone None: the table has one column per dataset (Table 5). Table 1 (DFME soft / DFMS-HL hard labels,
# CIFAR), Table 4 (DFME, MNIST: the paper gives only the MISLEADER row) and Table 5 (Knockoff Nets).
def _table1():
    methods = ["undefended", "randp", "p-poison", "grad", "meco", "act", "dnf", "misleader"]
    clones = [("cifar10", "resnet18_8x"), ("cifar10", "mobilenet_v2"), ("cifar10", "densenet121"),
              ("cifar100", "resnet18_8x"), ("cifar100", "mobilenet_v2"), ("cifar100", "densenet121")]
    rows = {"dfme": [
        [87.36, 0.78, 75.23, 1.53, 73.89, 1.29, 58.72, 2.82, 28.36, 1.97, 27.28, 2.08],
        [84.28, 1.37, 70.56, 2.23, 70.03, 2.38, 41.69, 2.91, 22.75, 2.19, 23.61, 2.70],
        [78.06, 1.73, 66.32, 1.36, 68.75, 1.40, 38.72, 3.06, 20.87, 2.61, 21.89, 2.93],
        [79.33, 1.68, 65.82, 1.67, 69.06, 1.57, 39.07, 2.72, 20.71, 2.80, 22.08, 2.78],
        [51.68, 1.96, 46.53, 2.09, 61.38, 2.41, 29.57, 1.97, 12.18, 1.05, 10.79, 1.36],
        [46.57, 2.83, 40.32, 2.96, 49.25, 2.67, 23.95, 2.38, 10.09, 2.53, 6.26, 2.38],
        [53.91, 2.30, 46.32, 1.45, 47.21, 2.15, 18.03, 3.03, 10.82, 1.34, 6.75, 1.23],
        [40.70, 2.89, 39.82, 1.73, 31.73, 1.14, 15.28, 1.39, 7.71, 1.65, 4.87, 1.32]], "dfms-hl": [
        [84.67, 1.90, 79.28, 1.87, 68.87, 2.08, 72.57, 1.28, 62.71, 1.68, 63.58, 1.79],
        [84.02, 2.31, 78.71, 1.93, 68.16, 2.23, 72.43, 1.43, 62.06, 1.82, 63.16, 1.73],
        [84.06, 1.87, 79.12, 1.72, 68.05, 2.17, 71.83, 1.32, 61.83, 1.79, 62.73, 1.91],
        [84.28, 1.96, 79.36, 1.91, 69.81, 1.71, 71.89, 1.37, 62.60, 1.71, 62.57, 1.80],
        [76.86, 2.09, 71.22, 1.87, 62.33, 2.01, 59.30, 1.70, 55.32, 1.65, 56.80, 1.86],
        [73.93, 2.67, 71.97, 2.08, 61.08, 2.39, 55.38, 1.97, 51.46, 1.89, 52.29, 2.03],
        [76.51, 2.12, 75.01, 1.25, 61.02, 1.21, 52.98, 2.24, 48.41, 1.78, 49.72, 1.24],
        [71.04, 2.53, 67.46, 2.44, 60.43, 2.10, 55.82, 1.39, 46.03, 1.63, 45.82, 1.51]]}
    table = {}
    for attack, values in rows.items():
        for method, row in zip(methods, values):
            for i, (dataset, clone) in enumerate(clones):
                table[(attack, dataset, method, clone)] = (row[2 * i], row[2 * i + 1])
    return table


PAPER_CLONE = {
    **_table1(),
    ("dfme", "mnist", "misleader", "lenet5"): (11.81, 0.64), ("dfme", "mnist", "misleader", "lenet5_half"): (11.80, 2.98),
    ("dfme", "mnist", "misleader", "lenet5_fifth"): (15.91, 2.97),
    **{("knockoff", d, m, None): (v, None) for m, vals in {
        "undefended": (90.18, 85.39, 53.04), "edm": (51.34, 68.50, 41.16), "edm+meco": (46.19, 59.18, 35.71),
        "edm+act": (45.78, 60.21, 34.67), "misleader": (40.35, 54.85, 28.76)}.items()
       for d, v in zip(("mnist", "cifar10", "cifar100"), vals)},
}
# Reduced CPU architectures compared against the paper's full-size one (marked in the tables).
PAPER_ARCH = {"resnet18_8x_w16": "resnet18_8x"}


# Rows in the paper's order (Table 1: undefended, its six baselines, MISLEADER last); the defenses it does not list in
# Table 1 go before MISLEADER, then anything else alphabetically.
PAPER_ROW_ORDER = ("undefended", "randp", "p-poison", "grad", "meco", "act", "dnf", "misinformation", "edm",
                   "edm+meco", "edm+act")


def method_rank(method):
    """Sort key placing a victim method's row where the paper's tables put it."""
    if method == "misleader":
        return (2, 0, "")
    if method in PAPER_ROW_ORDER:
        return (0, PAPER_ROW_ORDER.index(method), "")
    return (1, 0, method)


def victim_method(kind, method=None):
    """The paper's row name for a victim: its defense method; an undefended target is 'undefended'."""
    return method or ("undefended" if kind == "target" else kind)


def paper_clone(attack, dataset, method, clone):
    """(mean, std, exact) of the paper's clone accuracy for this cell, or None; exact False for a reduced arch."""
    candidates = [(clone, True)] + ([(PAPER_ARCH[clone], False)] if clone in PAPER_ARCH else []) + [(None, True)]
    for arch, exact in candidates:  # the exact clone, its full-size original, then a per-dataset figure
        hit = PAPER_CLONE.get((attack, dataset, method, arch))
        if hit:
            return hit[0], hit[1], exact
    return None


def paper_clone_acc(attack, dataset, victim_kind, clone, method=None):
    hit = paper_clone(attack, dataset, victim_method(victim_kind, method), clone)
    return hit[0] if hit else None


def extraction_rows(run_folders):
    """One row per attack run folder (its result.json): what was attacked, how, and what the clone reached."""
    rows = []
    for folder in run_folders:
        path = pathlib.Path(folder) / "result.json"
        if not path.exists():
            from toolkit.errors import UserError

            raise UserError(f"{path}: no attack result (run mtk extract first)")
        r = json.loads(path.read_text())
        spec = r["spec"]
        victim_card = read_card(r["victim"])
        dataset = victim_card["dataset"]["name"]
        detail = {"dfme": lambda: f"preset {r['preset']}" + (", released prob-as-logit flaw"
                                                            if released_flaw(spec) else ""),
                  "knockoff": lambda: f"{spec['knockoff']['policy']}, surrogate "
                                      f"{(spec['knockoff']['surrogate']['dataset'] or {}).get('name', dataset)} "
                                      f"{'+'.join(spec['knockoff']['surrogate']['splits'])}",
                  "dfms-hl": lambda: f"proxy {(spec['dfms_hl']['proxy'] or {}).get('name', 'shapes')}"}[r["attack"]]()
        rows.append({"run": str(folder), "attack": r["attack"], "setting": detail, "dataset": dataset,
                     "victim": r["victim_name"], "victim_kind": r["victim_kind"], "output": r["oracle"]["output"],
                     "clone": r["clone_architecture"], "budget": r["budget"], "queries_used": r["queries_used"],
                     "victim_test_acc": r["victim_test_acc"], "clone_test_acc": r["clone_test_acc"],
                     "fidelity": r["fidelity"], "wall_seconds": r["wall_seconds"], "dry_run": r.get("dry_run", False),
                     "paper_clone_acc": paper_clone_acc(r["attack"], dataset, r["victim_kind"],
                                                        r["clone_architecture"], victim_card.get("method")),
                     "curve": r["curve"]})
    return rows


def write_extraction(run_folders, out, command):
    """results/<out>.json + .md (clone accuracy table) + .png (accuracy vs queries, when matplotlib is there)."""
    rows = extraction_rows(run_folders)
    out = pathlib.Path(out)
    record = {"table": "clone accuracy (paper Tables 1, 4, 5 analogue)", "command": command, "rows": rows}
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
    lines = ["# Model extraction: clone accuracy", "", f"Produced by `{command}`.",
             "Accuracies in % on the victim dataset's test set (reporting only: no attack decision used it). "
             "Fidelity: agreement of the clone's top-1 with the victim's on that test set.", "",
             "| dataset | attack | setting | victim | API | clone | queries | victim acc | clone acc | fidelity | "
             "paper clone acc | wall |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = f"{r['paper_clone_acc']:.2f}" if r["paper_clone_acc"] is not None else ""
        victim = f"{r['victim']} ({r['victim_kind']})" + (" dry run" if r["dry_run"] else "")
        lines.append(f"| {r['dataset']} | {r['attack']} | {r['setting']} | {victim} | {r['output']} | {r['clone']} | "
                     f"{r['queries_used']:,} | {_pct(r['victim_test_acc'])} | {100 * r['clone_test_acc']:.2f} | "
                     f"{_pct(r['fidelity'])} | {paper} | {r['wall_seconds'] / 60:.0f} min |")
    plotted = _plot_curves(rows, out.with_suffix(".png"))
    if plotted:
        lines += ["", f"Accuracy-vs-queries curves: `{out.with_suffix('.png').name}`."]
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    return rows


def _plot_curves(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        points = [(p["queries"], 100 * p["clone_test_acc"]) for p in r["curve"] if "clone_test_acc" in p]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=f"{r['attack']} vs {r['victim']} ({r['clone']})")
    ax.set_xlabel("victim queries")
    ax.set_ylabel("clone test accuracy (%)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _mean_std(values):
    import statistics

    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _victim_facts(record):
    """dataset, method, kind, name and card metrics of a record's victim: from the record itself (so a report needs
    only the store), from the victim's card for records written before the result carried them."""
    res = record["result"]
    if "dataset" in res:
        return res["dataset"], res["victim_method"], res["victim_kind"], res["victim_name"], res["victim_metrics"]
    card = read_card(record["threat_spec"]["victim"])
    return (card["dataset"]["name"], victim_method(card.get("kind"), card.get("method")), card.get("kind"),
            card.get("name"), card.get("metrics", {}))


def _schedule(rec):
    """The query budget a DFME cell's schedule spans when the cell runs only its first ``budget`` queries; else 0."""
    return (rec["threat_spec"].get("dfme") or {}).get("schedule_budget") or 0


def released_flaw(threat_spec):
    """Whether a threat reproduces the released MISLEADER evaluation's flaw (probabilities fed to DFME as logits)."""
    return bool((threat_spec.get("dfme") or {}).get("released_prob_as_logit"))


FLAW_LABEL = "(prob-as-logit flaw)"
CHANCE_MARGIN = 2.0  # points: an undefended clone this close to chance means the attack has not started


def chance(dataset):
    """Top-1 accuracy of a uniform guess on ``dataset``, in %; None when its class count is unknown."""
    from toolkit.data.registry import dataset_info

    info = dataset_info(dataset)
    return 100.0 / info.num_classes if info is not None and info.num_classes else None


def not_started(group, clone):
    """The validity rule: a table column (one clone) whose undefended clone is within CHANCE_MARGIN of chance
    ranks no defense. A column without an undefended row is not judged here."""
    base = next((r for r in group if r["clone"] == clone and r["method"] == "undefended"), None)
    level = chance(base["dataset"]) if base else None
    return level is not None and base["clone_acc_mean"] - level <= CHANCE_MARGIN


def _preset(rec):
    """A cell's attack preset as its table names it; the released prob-as-logit flaw is part of it (the release
    applies it to ensembles only, so one preset is run with and without it)."""
    return rec["cell"]["preset"] + (f" {FLAW_LABEL}" if released_flaw(rec["threat_spec"]) else "")


def experiment_rows(records):
    """Clone accuracy and fidelity, mean and std over seeds, per dataset x attack (preset) x budget x defense x clone."""
    groups = {}
    for rec in records:
        cell, res = rec["cell"], rec["result"]
        dataset, method, kind, name, _ = _victim_facts(rec)
        key = (dataset, cell["attack"], _preset(rec), cell["budget"], _schedule(rec),
               rec["threat_spec"]["oracle"]["output"], method, name, kind, cell["clone"])
        groups.setdefault(key, []).append(res)
    rows = []
    for (dataset, attack, preset, budget, schedule, output, method, victim, kind, clone), results in sorted(
            groups.items()):
        acc_m, acc_s = _mean_std([100 * r["clone_test_acc"] for r in results])
        measured = [100 * r["fidelity"] for r in results if r["fidelity"] is not None]  # None: a remote victim
        fid_m, fid_s = _mean_std(measured) if measured else (None, None)
        paper = paper_clone(attack, dataset, method, clone)
        rows.append({"dataset": dataset, "attack": attack, "preset": preset, "budget": budget,
                     "schedule_budget": schedule or None, "output": output,
                     "method": method, "victim": victim, "victim_kind": kind, "clone": clone, "seeds": len(results),
                     "clone_acc_mean": acc_m, "clone_acc_std": acc_s, "fidelity_mean": fid_m, "fidelity_std": fid_s,
                     "victim_acc": None if results[0]["victim_test_acc"] is None else 100 * results[0]["victim_test_acc"],
                     "queries_used": max(r["queries_used"] for r in results),
                     "queries_lost": _lost(results),
                     "paper_clone_acc": paper[0] if paper else None,
                     "paper_clone_std": paper[1] if paper else None,
                     "paper_arch_exact": paper[2] if paper else None,
                     "wall_minutes": sum(r["wall_seconds"] for r in results) / 60})
    for _, group in _by_table(rows):  # the validity rule, for machine readers too
        for r in group:
            r["attack_started"] = not not_started(group, r["clone"])
    return rows


def _lost(results):
    """Queries lost to restarts over a row's seeds; None when a record predates the count."""
    lost = [r.get("queries_lost_to_restarts") for r in results]
    return None if None in lost else sum(lost)


def experiment_utility(records, defense_folders=()):
    """Table 2: each victim's test accuracy and agreement with its target (from the records, plus any built defense
    folders of the spec that no record mentions yet)."""
    seen = {}
    for rec in records:
        dataset, method, kind, name, metrics = _victim_facts(rec)
        seen.setdefault((dataset, method, name), (kind, metrics))
    for folder in defense_folders:
        folder = pathlib.Path(folder)
        if (folder / "card.json").exists():
            card = read_card(folder)
            key = (card["dataset"]["name"], victim_method(card.get("kind"), card.get("method")), card.get("name"))
            seen.setdefault(key, (card.get("kind"), card.get("metrics", {})))
    rows = []
    for (dataset, method, name), (kind, metrics) in sorted(seen.items(), key=lambda kv: (
            kv[0][0], method_rank(kv[0][1]), kv[0][2])):
        rows.append({"dataset": dataset, "method": method, "victim": name, "victim_kind": kind,
                     "val_acc": 100 * metrics["val_acc"] if "val_acc" in metrics else None,
                     "test_acc": 100 * metrics["test_acc"] if "test_acc" in metrics else None,
                     "agreement_with_target": 100 * metrics.get("test_agreement_with_target", 1.0),
                     "paper_test_acc": PAPER_UTILITY.get(dataset) if method == "misleader" else None})
    return rows


def _pct(value):
    return "" if value is None else f"{100 * value:.2f}"


def _fmt(mean, std, n=None):
    return f"{mean:.2f} ± {std:.2f}" + (f" [{n}]" if n is not None else "")


def write_experiment_report(store, out, command, title, defense_folders=(), cell_ids=None, clone_order=()):
    """<out>.md, .csv, .json (the paper's layouts: defenses as rows, clone architectures as columns, Table 2 utility)
    plus <out>-budget.png (clone accuracy vs queries per defense, Fig. 3) and <out>-matrix.png (attacker x
    single-member defense architecture, Fig. 2) when the store has such cells. With ``cell_ids`` (the grid's cells)
    records of cells the grid no longer has (an edited spec) are left out, and counted."""
    import csv
    import io

    records = store.all()
    stale = 0
    if cell_ids is not None:
        wanted = set(cell_ids)
        stale = sum(r["id"] not in wanted for r in records)
        records = [r for r in records if r["id"] in wanted]
    rows = experiment_rows(records)
    utility = experiment_utility(records, defense_folders)
    out = pathlib.Path(out)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(
        {"title": title, "command": command, "rows": rows, "utility": utility}, indent=2) + "\n").encode())
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_bytes(out.with_suffix(".csv"), buffer.getvalue().encode())
    of = f" of the grid's {len(cell_ids)} cells" if cell_ids is not None else ""
    if stale:
        of += f" ({stale} records of cells no longer in the grid left out)"
    if cell_ids is not None and not cell_ids and not records:  # a grid without threats: Table 2 only
        lines = [f"# {title}", "", f"Produced by `{command}` from the cards of the grid's built defenses (a grid "
                 "without attacks).", ""]
    else:
        lines = [f"# {title}", "", f"Produced by `{command}` from {len(records)} records{of} in `{store.root}`.", "",
                 "Clone test accuracy in %, mean ± std over seeds [number of seeds]; the paper's figure (mean ± std "
                 "over its 5 seeds) beside ours where it has one, marked ≈ where our clone is a reduced CPU version of "
                 "the paper's architecture. Each table names its attack preset, API and budget.", ""]
    rank = lambda c: list(clone_order).index(c) if c in clone_order else len(clone_order)  # noqa: E731
    for (dataset, attack, preset, budget, schedule, output), group in _by_table(rows):
        clones = sorted(dict.fromkeys(r["clone"] for r in group), key=rank)
        of = f" (the first {budget:,} of a {schedule:,}-query schedule)" if schedule else ""
        lines += [f"## {dataset}: {attack}, {preset} preset, {output}-label API, budget {budget:,} queries{of}", ""]
        if FLAW_LABEL in preset:
            lines += ["Run **with the released evaluation's flaw** (the victim's probabilities fed to the clone's loss "
                      "as if they were logits): not a valid DFME attack, kept only to compare with the released "
                      "numbers.", ""]
        unstarted = [c for c in clones if not_started(group, c)]
        if unstarted:
            lines += [f"Column {', '.join(unstarted)}: attack has not started: no ranking (the undefended target's "
                      f"clone is within {CHANCE_MARGIN:g} points of chance, {chance(dataset):.2f} %, so this column "
                      "says nothing about any defense).", ""]
        lines += ["| defense (victim) | " + " | ".join(clones) + " |", "|---|" + "---|" * len(clones)]
        for (method, victim, kind), vrows in _by_victim(group):
            cells = []
            for clone in clones:
                r = next((x for x in vrows if x["clone"] == clone), None)
                if r is None:
                    cells.append("")
                    continue
                text = _fmt(r["clone_acc_mean"], r["clone_acc_std"], r["seeds"])
                if clone in unstarted:
                    text += " (not started)"
                if r["paper_clone_acc"] is not None:
                    mark = "" if r["paper_arch_exact"] else "≈"
                    std = f" ± {r['paper_clone_std']:.2f}" if r["paper_clone_std"] is not None else ""
                    text += f" (paper {mark}{r['paper_clone_acc']:.2f}{std})"
                cells.append(text)
            lines.append(f"| {method} ({victim}) | " + " | ".join(cells) + " |")
        lines.append("")
    if rows:
        lines += ["## Details: fidelity, victim accuracy, queries and wall time", "",
                  "Queries lost: paid for by a run killed after its last checkpoint (counted against the budget, never "
                  "learned from), summed over seeds; – where a record predates this count.", "",
                  "| dataset | attack | preset | budget | victim | clone | seeds | fidelity | victim acc | queries used "
                  "| queries lost | wall (all seeds) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        details = [r for _, group in _by_table(rows) for _, vrows in _by_victim(group)  # the tables' order
                   for r in sorted(vrows, key=lambda r: rank(r["clone"]))]
        for r in details:
            lines.append(f"| {r['dataset']} | {r['attack']} | {r['preset']} | {r['budget']:,} | {r['method']} "
                         f"({r['victim']}) | {r['clone']} | {r['seeds']} | "
                         f"{'' if r['fidelity_mean'] is None else _fmt(r['fidelity_mean'], r['fidelity_std'])}"
                         f" | {'' if r['victim_acc'] is None else format(r['victim_acc'], '.2f')} | "
                         f"{r['queries_used']:,} | {'–' if r['queries_lost'] is None else format(r['queries_lost'], ',')}"
                         f" | {r['wall_minutes']:.0f} min |")
        lines.append("")
    if utility:
        lines += ["## Utility (Table 2 analogue)", "",
                  "Test accuracy in % of each deployed victim on clean test data, and its top-1 agreement with the "
                  "undefended target; model selection used the validation split only.", "",
                  "| dataset | defense (victim) | val acc | test acc | agreement with target | paper test acc |",
                  "|---|---|---|---|---|---|"]
        for u in utility:
            val = f"{u['val_acc']:.2f}" if u["val_acc"] is not None else ""
            test = f"{u['test_acc']:.2f}" if u["test_acc"] is not None else ""
            paper = f"{u['paper_test_acc']:.2f}" if u["paper_test_acc"] else ""
            lines.append(f"| {u['dataset']} | {u['method']} ({u['victim']}) | {val} | {test} | "
                         f"{u['agreement_with_target']:.2f} | {paper} |")
        lines.append("")
    budget_png = out.with_name(out.name + "-budget.png")
    if _plot_budget(records, budget_png):
        lines.append(f"Clone accuracy vs queries spent, per defense (Fig. 3 analogue, mean over seeds): "
                     f"`{budget_png.name}`.")
    else:
        budget_png.unlink(missing_ok=True)  # an earlier report's plot would show records left out now
    matrix_png = out.with_name(out.name + "-matrix.png")
    if _plot_matrix(rows, matrix_png):
        lines.append(f"Attacker architecture x single-member defense architecture (Fig. 2 analogue): "
                     f"`{matrix_png.name}`.")
    else:
        matrix_png.unlink(missing_ok=True)
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    return rows


def _by_table(rows):
    tables = {}
    for r in rows:
        tables.setdefault((r["dataset"], r["attack"], r["preset"], r["budget"], r.get("schedule_budget") or 0,
                           r["output"]), []).append(r)
    return sorted(tables.items())


def _by_victim(rows):
    victims = {}
    for r in rows:
        victims.setdefault((r["method"], r["victim"], r["victim_kind"]), []).append(r)
    return sorted(victims.items(), key=lambda kv: (method_rank(kv[0][0]), kv[0]))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def budget_curves(records):
    """{(dataset, attack, preset, clone): {victim label: [(queries, mean clone acc %), ...]}}: each run's own curve
    averaged over seeds at each query count, plus the final accuracy at each cell's budget."""
    panels = {}
    for rec in records:
        dataset, method, _, name, _ = _victim_facts(rec)
        cell, res = rec["cell"], rec["result"]
        points = {p["queries"]: 100 * p["clone_test_acc"] for p in res["curve"] if "clone_test_acc" in p}
        points[res["queries_used"]] = 100 * res["clone_test_acc"]
        label = f"{method} ({name})"
        if _schedule(rec):  # a truncated run's curve is part of a longer schedule's: never averaged with a whole one
            label += f", {_schedule(rec):,}-query schedule"
        panel = panels.setdefault((dataset, cell["attack"], _preset(rec), cell["clone"]), {})
        for q, acc in points.items():
            panel.setdefault(label, {}).setdefault(q, []).append(acc)
    return {key: {label: sorted((q, sum(v) / len(v)) for q, v in series.items()) for label, series in panel.items()}
            for key, panel in panels.items()}


def _plot_budget(records, path):
    plt = _pyplot()
    panels = budget_curves(records)
    if plt is None or not panels:
        return False
    import matplotlib.ticker
    keys = sorted(panels)
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, points in sorted(panels[key].items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=".", label=label)
        ax.set_title(f"{key[0]} {key[1]} ({key[2]}), clone {key[3]}", fontsize=9)
        ax.set_xlabel("victim queries")
        ax.set_ylabel("clone test acc (%)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on short ranges
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_matrix(rows, path):
    """One heatmap per table whose victims are single defense members (>= 2) attacked with >= 2 clone archs."""
    plt = _pyplot()
    tables = []
    for key, group in _by_table(rows):
        members = sorted({r["victim"] for r in group if r["victim_kind"] == "member"})
        clones = list(dict.fromkeys(r["clone"] for r in group))
        if len(members) >= 2 and len(clones) >= 2:
            tables.append((key, members, clones, {(r["victim"], r["clone"]): r["clone_acc_mean"] for r in group}))
    if plt is None or not tables:
        return False
    fig, axes = plt.subplots(1, len(tables), figsize=(4.8 * len(tables), 4.2), squeeze=False)
    for ax, (key, members, clones, acc) in zip(axes.flat, tables):
        grid = [[acc.get((m, c), float("nan")) for c in clones] for m in members]
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
        for i, m in enumerate(members):
            for j, c in enumerate(clones):
                if (m, c) in acc:
                    ax.text(j, i, f"{acc[(m, c)]:.1f}", ha="center", va="center", color="white", fontsize=9)
        ax.set_xticks(range(len(clones)), clones, rotation=30, fontsize=8)
        ax.set_yticks(range(len(members)), members, fontsize=8)
        ax.set_xlabel("attacker (clone) architecture")
        ax.set_ylabel("single-member defense")
        ax.set_title(f"{key[0]} {key[1]} ({key[2]}), {key[3]:,} queries", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, label="clone test acc (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
