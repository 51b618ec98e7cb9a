"""Per-query cost of every built MNIST defense relative to the undefended target, at batch 1 and batch 256.

    .venv/bin/python benchmarks/defense_cost/run.py      (after the defenses are built: mtk run specs/experiments/cpu-table2-mnist.json)

Times ``predict_proba`` (the call every attack and the server make) on random 32x32 MNIST-shaped inputs: median of
repeated timings after warm-up. Writes results/defense_cost.json and .md. Folders not built yet are listed as missing.
"""

import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FOLDERS = ["runs/targets/mnist-lenet5", "runs/defenses/mnist-misleader"] + [
    f"runs/defenses/mnist-{m}" for m in ("randp", "randp-argmax", "p-poison", "p-poison-argmax", "grad",
                                         "grad-argmax", "misinformation", "edm", "meco", "act", "dnf")]


def per_query_ms(victim, x, seconds=3.0):
    victim.predict_proba(x)  # warm-up
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        victim.predict_proba(x)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times) / len(x)


def main():
    import numpy as np
    import torch

    from toolkit.artifacts import load_deployable, read_card

    rng = np.random.default_rng(0)
    rows, missing = [], []
    for folder in FOLDERS:
        path = ROOT / folder
        if not (path / "card.json").exists():
            missing.append(folder)
            continue
        victim, card = load_deployable(path), read_card(path)
        row = {"defense": card.get("method", card["kind"]), "folder": folder,
               "variant": card.get("deployable", {}).get("variant", "")}
        for batch in (1, 256):
            x = rng.random((batch, 1, 32, 32), dtype=np.float32)
            row[f"ms_per_query_b{batch}"] = per_query_ms(victim, x)
        rows.append(row)
        print(f"{folder}: {row['ms_per_query_b1']:.3f} ms/query at batch 1, {row['ms_per_query_b256']:.4f} at 256",
              flush=True)
    base = rows[0]
    for r in rows:
        for b in (1, 256):
            r[f"relative_b{b}"] = r[f"ms_per_query_b{b}"] / base[f"ms_per_query_b{b}"]
    command = "python benchmarks/defense_cost/run.py"
    record = {"command": command, "threads": torch.get_num_threads(), "rows": rows, "missing": missing}
    out = ROOT / "results" / "defense_cost"
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Per-query cost of each defense (MNIST, LeNet5 target)", "",
             f"Produced by `{command}` on this 2-core CPU ({torch.get_num_threads()} torch threads); median wall time "
             "of `predict_proba` per query, relative to the undefended target at the same batch size.", "",
             "| defense | variant | ms / query, batch 1 | x undefended | ms / query, batch 256 | x undefended |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['defense']} ({pathlib.Path(r['folder']).name}) | {r['variant']} | "
                     f"{r['ms_per_query_b1']:.3f} | {r['relative_b1']:.1f} | {r['ms_per_query_b256']:.4f} | "
                     f"{r['relative_b256']:.1f} |")
    if missing:
        lines += ["", "Not built when this ran: " + ", ".join(missing)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
