"""How soft are the answers DFME learns from? Target vs MISLEADER ensemble (and its members) on the MNIST test set,
on uniform noise and on an untrained DFME generator's images (where the attack starts).

    .venv/bin/python benchmarks/answer_softness/run.py    (after mtk defend specs/mnist-misleader.json)

Tests the README's guess for why DFME extracts our MNIST ensemble better than the target: a distilled, soft-voted
ensemble answers with softer probabilities, so the logits DFME recovers (log p minus its mean) carry more about the
non-top classes. Per model and input set: mean top-1 probability, mean entropy (nats), the spread (std over classes)
of the recovered logits, top-1 agreement with the target and how many classes are the top-1 answer of >= 1 % of
the inputs (how much class signal the attack gets from the start). Writes results/answer_softness.json and .md.
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TARGET, ENSEMBLE = "runs/targets/mnist-lenet5", "runs/defenses/mnist-misleader"
N = 2000


def inputs(card, data_root):
    import numpy as np
    import torch

    from toolkit.artifacts import dataset_config
    from toolkit.data.registry import load_dataset
    from toolkit.models.generators import dfme_generator

    test = load_dataset(dataset_config(card), data_root).test
    shape = tuple(card["dataset"]["input_shape"])
    import keras

    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)  # the generator's initial weights and the latent draws
    generator = dfme_generator(256, shape)
    with torch.no_grad():
        generated = (torch.tanh(generator(torch.randn(N, 256), training=False)) + 1) / 2
    return {"test images": test.x[:N], "uniform noise": rng.random((N, *shape), dtype=np.float32),
            "untrained DFME generator": generated.numpy()}


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

    folders = [TARGET, ENSEMBLE] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / ENSEMBLE / "members").iterdir()
                                          if (p / "card.json").exists())
    for folder in (TARGET, ENSEMBLE):
        if not (ROOT / folder / "card.json").exists():
            sys.exit(f"{folder}: not built (run mtk defend specs/mnist-misleader.json first)")
    sets = inputs(read_card(ROOT / TARGET), None)
    models = {f: load_deployable(ROOT / f) for f in folders}
    rows = []
    for name, x in sets.items():
        reference = models[TARGET].predict_proba(x)
        for folder, model in models.items():
            rows.append({"inputs": name, "model": folder, **stats(model.predict_proba(x), reference)})
            print(rows[-1], flush=True)
    command = "python benchmarks/answer_softness/run.py"
    out = ROOT / "results" / "answer_softness"
    out.with_suffix(".json").write_text(json.dumps({"command": command, "n_per_set": N, "rows": rows}, indent=2))
    lines = ["# Answer softness: target vs MISLEADER ensemble (MNIST)", "", f"Command: `{command}`; {N} inputs per set.",
             "Logit spread: std over classes of log(p) - mean(log p), the target DFME's clone regresses on.", "",
             "| inputs | model | top-1 prob | entropy (nats) | logit spread | top-1 agreement with target | classes answered |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['inputs']} | {r['model']} | {r['top1_prob']:.4f} | {r['entropy_nats']:.4f} | "
              f"{r['logit_spread']:.2f} | {100 * r['agreement_with_target']:.2f} % | {r['top1_classes']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
