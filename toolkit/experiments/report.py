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
