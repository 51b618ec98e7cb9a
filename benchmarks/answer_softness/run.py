"""How soft are the answers DFME learns from? Target vs MISLEADER ensemble (and its members, or the baselines) on
the test set, on uniform noise and on an untrained DFME generator's images (where the attack starts), in the
reference query space (mean + std * tanh, DFME's default) and in the earlier unit one ((tanh + 1) / 2).

    .venv/bin/python benchmarks/answer_softness/run.py    (after mtk defend specs/mnist-misleader.json)
    .venv/bin/python benchmarks/answer_softness/run.py --dataset cifar10    (after the cpu-table1-cifar10 grid built
        its victims: the reduced target, MISLEADER ensemble and the six Table 1 baselines)

Tests the README's guess for why DFME extracts our MNIST ensemble better than the target: a distilled, soft-voted
ensemble answers with softer probabilities, so the logits DFME recovers (log p minus its mean) carry more about the
non-top classes. Per model and input set: mean top-1 probability, mean entropy (nats), the spread (std over classes)
of the recovered logits, top-1 agreement with the target and how many classes are the top-1 answer of >= 1 % of
the inputs (how much class signal the attack gets from the start). Writes results/answer_softness.{json,md}
(MNIST) or results/answer_softness-cifar10.{json,md}.
"""

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Per dataset: its name in titles, the target, the MISLEADER ensemble, the other victims compared (None: the
# ensemble's members), the results file and the command that builds them.
PRESETS = {
    "mnist": ("MNIST", "runs/targets/mnist-lenet5", "runs/defenses/mnist-misleader", None, "answer_softness",
              "mtk defend specs/mnist-misleader.json"),
    "cifar10": ("CIFAR-10", "runs/targets/cifar10-cpu", "runs/defenses/cifar10-cpu-misleader",
                [f"runs/defenses/cifar10-cpu-{m}" for m in ("randp", "p-poison", "grad", "meco", "act", "dnf")],
                "answer_softness-cifar10", "bash benchmarks/reproduce/cpu.sh cpu-table1-cifar10"),
}
N = 2000


def inputs(card, data_root):
    import numpy as np
    import torch

    from toolkit.artifacts import dataset_config
    from toolkit.attacks.dfme import pixels
    from toolkit.data.registry import load_dataset
    from toolkit.models.generators import dfme_generator

    data = load_dataset(dataset_config(card), data_root)
    test = data.test
    shape = tuple(card["dataset"]["input_shape"])
    import keras

    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)  # the generator's initial weights and the latent draws
    generator = dfme_generator(256, shape)
    with torch.no_grad():
        pre = generator(torch.randn(N, 256), training=False)
    return {"test images": test.x[:N], "uniform noise": rng.random((N, *shape), dtype=np.float32),
            "untrained DFME generator, reference query space": pixels(pre, "reference", data.mean, data.std).numpy(),
            "untrained DFME generator, earlier unit query space": pixels(pre, "unit", data.mean, data.std).numpy()}


def stats(probs, reference):
    import torch

    from toolkit.oracle import recover_logits

    p = probs.clamp_min(1e-12)
    return {"top1_prob": float(probs.max(1).values.mean()), "entropy_nats": float(-(p * p.log()).sum(1).mean()),
            "logit_spread": float(recover_logits(probs).std(1).mean()),
            "agreement_with_target": float((probs.argmax(1) == reference.argmax(1)).float().mean()),
            "top1_classes": int((torch.bincount(probs.argmax(1), minlength=probs.shape[1]) >= 0.01 * len(probs)).sum())}


def main():
    from toolkit.artifacts import load_deployable, read_card

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(PRESETS), default="mnist")
    dataset = parser.parse_args().dataset
    title, target, ensemble, others, stem, build = PRESETS[dataset]
    if others is None:
        others = sorted(str(p.relative_to(ROOT)) for p in (ROOT / ensemble / "members").glob("*")
                        if (p / "card.json").exists())
    folders = [target, ensemble] + others
    for folder in folders:
        if not (ROOT / folder / "card.json").exists():
            sys.exit(f"{folder}: not built (run {build} first)")
    sets = inputs(read_card(ROOT / target), None)
    models = {f: load_deployable(ROOT / f) for f in folders}
    rows = []
    for name, x in sets.items():
        reference = models[target].predict_proba(x)
        for folder, model in models.items():
            rows.append({"inputs": name, "model": folder, **stats(model.predict_proba(x), reference)})
            print(rows[-1], flush=True)
    command = "python benchmarks/answer_softness/run.py" + ("" if dataset == "mnist" else f" --dataset {dataset}")
    out = ROOT / "results" / stem
    out.with_suffix(".json").write_text(json.dumps({"command": command, "n_per_set": N, "rows": rows}, indent=2))
    lines = [f"# Answer softness: target vs MISLEADER ensemble ({title})",
             "", f"Command: `{command}`; {N} inputs per set.",
             "Logit spread: std over classes of log(p) - mean(log p), the target DFME's clone regresses on.", "",
             "| inputs | model | top-1 prob | entropy (nats) | logit spread | top-1 agreement with target | classes answered |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['inputs']} | {r['model']} | {r['top1_prob']:.4f} | {r['entropy_nats']:.4f} | "
              f"{r['logit_spread']:.2f} | {100 * r['agreement_with_target']:.2f} % | {r['top1_classes']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
