"""Side by side: mtk's attacks and their reference implementations' own code, on the same victim weights.

The reference code is read from a checkout outside this repository, pinned (``--ref``; nothing of it is copied
here); the shims below only adapt it to this CPU, to MNIST and to mtk's victim. Each run writes one JSON of
clone test accuracy at >= 5 checkpoints under results/faithfulness/; ``report`` compares the curves.

    git clone <mirror of cake-lab/datafree-model-extraction> /work/refs/cake && git -C /work/refs/cake checkout 525b76c
    git clone <mirror of tribhuvanesh/knockoffnets> /work/refs/knockoff && git -C /work/refs/knockoff checkout b830985
    mtk train-target specs/targets/mnist-lenet5.json                      # the victim both sides attack
    python benchmarks/faithfulness/run.py dfme --impl reference --ref /work/refs/cake --seed 0
    python benchmarks/faithfulness/run.py dfme --impl mtk --seed 0        # [--query-space unit: the old mapping]
    python benchmarks/faithfulness/run.py knockoff --impl reference --ref /work/refs/knockoff --cake /work/refs/cake --seed 0
    python benchmarks/faithfulness/run.py knockoff --impl mtk --seed 0
    python benchmarks/faithfulness/run.py knockoff --impl reference ... --seed 0 --budget 2000   # [same, --impl mtk]
    python benchmarks/faithfulness/run.py report                           # -> results/faithfulness.md + .png + .json

DFME: the first ``--epochs`` epochs (50 iterations, 89,600 queries each) of the paper's 2M-query MNIST schedule
(cake-lab's MultiStepLR over 23 epochs), LeNet5 clone, clone accuracy after every epoch. Knockoff: random policy,
``--budget`` MNIST training images, then 100 epochs (SGD 0.01 m 0.5, StepLR 60) of cake-lab's LeNet5 on the whole
transfer set (knockoffnets' MNIST LeNet takes 28x28 inputs; the victim takes 32x32), accuracy every 10 epochs.
At 20k the curves saturate near 98.8 % from epoch 20, where any sound trainer agrees; ``--budget 2000`` is the
harder check, its first epochs still rising.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "results" / "faithfulness"
VICTIM = ROOT / "runs" / "targets" / "mnist-lenet5"
DFME_SCHEDULE_BUDGET = 2_000_000  # the paper's MNIST budget: both sides follow its schedule
DFME_EPOCH_QUERIES = 50 * 256 * (1 * (1 + 1) + 5)  # epoch_itrs x B x (g_iter (m + 1) + d_iter) = 89,600


def victim_and_data(victim_path):
    import toolkit  # noqa: F401  (pins the Keras backend)
    from toolkit.artifacts import dataset_config, load_deployable
    from toolkit.data import load_dataset

    victim = load_deployable(victim_path)
    return victim, load_dataset(dataset_config(victim.card))


class Counter:
    """Counts the rows the reference code sends to the victim (its own budget accounting is checked against it)."""
    rows = 0


def reference_teacher(victim, data, counter):
    """mtk's victim behind the reference interface: a torch module on normalised inputs returning logits
    (log-probabilities: softmax and log_softmax of them give back the victim's probabilities exactly)."""
    import torch

    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)

    class Teacher(torch.nn.Module):
        def forward(self, x):
            counter.rows += int(x.shape[0])
            with torch.no_grad():
                return torch.log(victim.predict_proba(mean + std * x.detach()).float().clamp_min(1e-12))

    return Teacher().eval()


def normalised_test_loader(data, batch=500):
    import torch

    x = torch.from_numpy(data.test.x).float() / 255
    x = (x - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
    dataset = torch.utils.data.TensorDataset(x, torch.from_numpy(data.test.y).long())
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)


def stub_modules(*names):
    """CPU shim: empty stand-ins for modules the reference imports but never uses on the paths run here."""
    for name in names:
        stub = types.ModuleType(name)
        stub.__getattr__ = lambda attr: None
        stub.__path__ = []
        sys.modules.setdefault(name, stub)


def write(name, record):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {path}")


def git_commit(path):
    import subprocess

    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


# --- DFME --------------------------------------------------------------------------------------------------------
def dfme_reference(args):
    """cake-lab's own main() (dfme/train.py), shimmed: MNIST test loader, mtk's victim as its teacher, its LeNet5 as
    the student, a one-channel generator, no white-box gradient logging, stopped after ``--epochs`` epochs."""
    import torch

    victim, data = victim_and_data(args.victim)
    ref = pathlib.Path(args.ref).resolve() / "dfme"
    stub_modules("ipdb", "scipy", "scipy.linalg")
    sys.path.insert(0, str(ref))
    work = tempfile.mkdtemp(prefix="cake-dfme-")
    os.chdir(work)  # it writes logs and checkpoints relative to the working directory
    import train as cake  # noqa: E402  (cake-lab's dfme/train.py)

    counter = Counter()
    teacher = reference_teacher(victim, data, counter)
    test_loader = normalised_test_loader(data)
    network = cake.network  # train.py's own name for it is swapped for a view whose generator has the MNIST channels
    one_channel = types.SimpleNamespace(GeneratorA=lambda **kw: network.gan.GeneratorA(**{**kw, "nc": data.input_shape[0]}))
    cake.network = types.SimpleNamespace(gan=one_channel, lenet=network.lenet, resnet_8x=network.resnet_8x)
    cake.get_classifier = lambda name, pretrained=True, num_classes=10: (
        teacher if pretrained else network.lenet.LeNet5())
    cake.get_dataloader = lambda a: (None, test_loader)
    original_test, curve = cake.test, []

    class Stop(Exception):
        pass

    def test(a, student=None, generator=None, device="cpu", test_loader=None, epoch=0):
        acc = original_test(a, student=student, generator=generator, device=device, test_loader=test_loader,
                            epoch=epoch)
        curve.append({"epoch": epoch, "queries": epoch * DFME_EPOCH_QUERIES, "victim_rows": counter.rows,
                      "clone_test_acc": float(acc), "seconds": round(time.time() - t0, 1)})
        print(f"[reference dfme] epoch {epoch}: clone test acc {acc:.4f} ({counter.rows} victim rows)", flush=True)
        if epoch >= args.epochs:
            raise Stop
        return acc

    cake.test = test
    sys.argv = ["train.py", "--query_budget", str(DFME_SCHEDULE_BUDGET / 1e6), "--seed", str(args.seed),
                "--rec_grad_norm", "0", "--no-cuda", "--model", "vgg11", "--log_dir", work + "/log",
                "--log_interval", "25", "--store_checkpoints", "0"]
    t0 = time.time()
    try:
        cake.main()
    except Stop:
        pass
    test_rows = len(test_loader.dataset)  # main() first measures the teacher on the test set (not attack queries)
    for point in curve:
        point["victim_rows"] -= test_rows
    write(f"dfme-reference-seed{args.seed}", {
        "attack": "dfme", "impl": "reference", "seed": args.seed, "code": "cake-lab/datafree-model-extraction",
        "commit": git_commit(args.ref), "schedule_budget": DFME_SCHEDULE_BUDGET, "curve": curve,
        "threads": torch.get_num_threads(), "wall_seconds": round(time.time() - t0, 1)})


def dfme_mtk(args):
    from toolkit.attacks.extract import extract

    budget = args.epochs * DFME_EPOCH_QUERIES
    spec = {"kind": "threat", "name": f"faithfulness-dfme-{args.query_space}-seed{args.seed}", "seed": args.seed,
            "attack": "dfme", "victim": str(args.victim), "budget": budget, "clone": {"architecture": "lenet5"},
            "preset": "canonical", "progress_every": DFME_EPOCH_QUERIES, "checkpoint_every": DFME_EPOCH_QUERIES,
            "dfme": {"schedule_budget": DFME_SCHEDULE_BUDGET, "query_space": args.query_space}}
    t0 = time.time()
    result = extract(spec, out=ROOT / "runs" / "faithfulness" / spec["name"])
    curve = [{"epoch": round(p["queries"] / DFME_EPOCH_QUERIES), "queries": p["queries"],
              "clone_test_acc": p["clone_test_acc"]} for p in result["curve"]]
    suffix = "" if args.query_space == "reference" else f"-{args.query_space}"
    write(f"dfme-mtk{suffix}-seed{args.seed}", {
        "attack": "dfme", "impl": "mtk" + suffix, "seed": args.seed, "query_space": args.query_space,
        "schedule_budget": DFME_SCHEDULE_BUDGET, "curve": curve, "wall_seconds": round(time.time() - t0, 1)})


# --- Knockoff ----------------------------------------------------------------------------------------------------
KNOCKOFF = {"epochs": 100, "lr": 0.01, "momentum": 0.5, "lr_step": 60, "lr_gamma": 0.1, "batch_size": 64}


def knockoff_name(impl, args):
    """Result file of one Knockoff run; the default 20k budget keeps the plain name."""
    budget = "" if args.budget == 20000 else f"-b{args.budget}"
    return f"knockoff{budget}-{impl}-seed{args.seed}"


def knockoff_pool(data):
    """The attacker's pool: the victim's whole MNIST training file (train + val + holdout), as mtk's preset."""
    import numpy as np

    splits = [data.split(s) for s in ("train", "val", "holdout")]
    return np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits])


def knockoff_reference(args):
    """knockoffnets' RandomAdversary.get_transferset and train_model, shimmed: mtk's victim in its Blackbox, the
    MNIST pool and test set as in-memory datasets with its own MNIST transform, cake-lab's LeNet5 as the clone."""
    import numpy as np
    import torch

    victim, data = victim_and_data(args.victim)
    sys.path.insert(0, str(pathlib.Path(args.ref).resolve()))
    sys.path.insert(0, str(pathlib.Path(args.cake).resolve() / "dfme"))
    stub_modules("ipdb", "scipy", "scipy.linalg",  # Cadene's ImageNet zoo, imported by knockoffnets' model zoo:
                 "pretrainedmodels", "pretrainedmodels.models", "pretrainedmodels.models.torchvision_models")
    import knockoff.config as kcfg
    from knockoff import datasets as kdatasets
    from knockoff.adversary.train import get_optimizer, samples_to_transferset
    from knockoff.adversary.transfer import RandomAdversary
    from knockoff.utils import model as model_utils
    from knockoff.victim.blackbox import Blackbox
    from network.lenet import LeNet5  # cake-lab's LeNet5 (the same layers as mtk's lenet5)

    kcfg.DEFAULT_SEED = args.seed
    counter = Counter()
    blackbox = Blackbox(reference_teacher(victim, data, counter), device=torch.device("cpu"), output_type="probs")
    transform = kdatasets.modelfamily_to_transforms["mnist"]["test"]
    pool_x, pool_y = knockoff_pool(data)
    from PIL import Image

    class Pool(torch.utils.data.Dataset):  # what its MNIST class offers: .data (raw uint8 images) and transformed items
        def __init__(self, x, y):
            self.data, self.targets = x[:, 0], y

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return transform(Image.fromarray(self.data[i])), int(self.targets[i])

    testset = Pool(data.test.x, data.test.y)
    t0 = time.time()
    adversary = RandomAdversary(blackbox, Pool(pool_x, pool_y), batch_size=args.query_batch)
    samples = adversary.get_transferset(args.budget)
    assert counter.rows == args.budget, (counter.rows, args.budget)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = LeNet5()
    transferset = samples_to_transferset(samples, budget=args.budget, transform=transform)
    optimizer = get_optimizer(model.parameters(), "sgdm", lr=KNOCKOFF["lr"], momentum=KNOCKOFF["momentum"])
    work = tempfile.mkdtemp(prefix="knockoff-")
    model_utils.train_model(model, transferset, work, testset=testset, criterion_train=model_utils.soft_cross_entropy,
                            device=torch.device("cpu"), optimizer=optimizer, num_workers=0, log_interval=10 ** 9,
                            checkpoint_suffix=".run", **{k: v for k, v in KNOCKOFF.items() if k not in ("lr",)},
                            lr=KNOCKOFF["lr"])
    curve = []
    for line in pathlib.Path(work, "train.run.log.tsv").read_text().splitlines()[1:]:
        _, epoch, split, _, acc, _ = line.split("\t")
        if split == "test" and int(epoch) % 10 == 0:
            curve.append({"epoch": int(epoch), "queries": args.budget, "clone_test_acc": float(acc) / 100})
    write(knockoff_name("reference", args), {
        "attack": "knockoff", "impl": "reference", "seed": args.seed, "code": "tribhuvanesh/knockoffnets",
        "commit": git_commit(args.ref), "budget": args.budget, "curve": curve, "threads": torch.get_num_threads(),
        "wall_seconds": round(time.time() - t0, 1)})


def knockoff_mtk(args):
    from toolkit.attacks.extract import extract

    spec = {"kind": "threat", "name": f"faithfulness-knockoff-b{args.budget}-seed{args.seed}", "seed": args.seed,
            "attack": "knockoff", "victim": str(args.victim), "budget": args.budget,
            "clone": {"architecture": "lenet5"},
            "knockoff": {"policy": "random", "protocol": "reference", "epochs": KNOCKOFF["epochs"],
                         "batch_size": KNOCKOFF["batch_size"], "query_batch": args.query_batch, "curve_points": 10,
                         "optimizer": {"name": "sgd", "lr": KNOCKOFF["lr"], "momentum": KNOCKOFF["momentum"]},
                         "schedule": {"name": "multistep", "milestones": [KNOCKOFF["lr_step"]],
                                      "gamma": KNOCKOFF["lr_gamma"]},
                         "surrogate": {"dataset": None, "splits": ["train", "val", "holdout"]}}}
    t0 = time.time()
    result = extract(spec, out=ROOT / "runs" / "faithfulness" / spec["name"])
    curve = [{"epoch": p["epoch"], "queries": p["queries"], "clone_test_acc": p["clone_test_acc"]}
             for p in result["curve"]]
    write(knockoff_name("mtk", args), {"attack": "knockoff", "impl": "mtk", "seed": args.seed,
                                            "budget": args.budget, "curve": curve,
                                            "wall_seconds": round(time.time() - t0, 1)})


# --- report ------------------------------------------------------------------------------------------------------
def report(args):
    """Mean and spread per checkpoint for each side; verdict: every checkpoint's gap within the seeds' noise."""
    import numpy as np

    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    out, lines = {}, ["# Faithfulness: mtk vs the reference implementations' own code", "",
                      "Written by `python benchmarks/faithfulness/run.py report` from the runs in "
                      "`results/faithfulness/` (commands in the script's docstring). Same victim weights (the MNIST "
                      "LeNet5 target, `specs/targets/mnist-lenet5.json`), same budget, same seeds, clone test accuracy "
                      "on the 10,000 MNIST test images.", ""]
    settings = sorted({(r["attack"], r.get("budget")) for r in runs}, key=lambda k: (k[0], -(k[1] or 0)))
    for attack, budget in settings:
        sides = {}
        for r in runs:
            if (r["attack"], r.get("budget")) == (attack, budget):
                sides.setdefault(r["impl"], []).append(r)
        if "reference" not in sides or "mtk" not in sides:
            continue
        table = {}
        for impl, rs in sides.items():
            epochs = sorted(set.intersection(*[{p["epoch"] for p in r["curve"]} for r in rs]))
            acc = {e: [next(p["clone_test_acc"] for p in r["curve"] if p["epoch"] == e) for r in rs] for e in epochs}
            table[impl] = {"seeds": sorted(r["seed"] for r in rs), "commit": rs[0].get("commit"),
                           "wall_seconds": [r["wall_seconds"] for r in rs],
                           "points": {e: {"queries": next(p["queries"] for p in rs[0]["curve"] if p["epoch"] == e),
                                          "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1
                                          else None, "values": v} for e, v in acc.items()}}
        common = sorted(set(table["reference"]["points"]) & set(table["mtk"]["points"]))
        verdict_rows, faithful = [], True
        for e in common:
            ref, ours = table["reference"]["points"][e], table["mtk"]["points"][e]
            gap = ours["mean"] - ref["mean"]
            stds = [s for s in (ref["std"], ours["std"]) if s is not None]
            n_ref, n_ours = len(ref["values"]), len(ours["values"])
            if stds and n_ref > 1 and n_ours > 1:  # within noise: |gap| <= 2 standard errors of the difference
                allowed = 2 * float(np.sqrt(ref["std"] ** 2 / n_ref + ours["std"] ** 2 / n_ours))
                allowed = max(allowed, 0.01)
            else:
                allowed = 0.03  # one seed a side: within 3 points
            ok = abs(gap) <= allowed
            faithful &= ok
            verdict_rows.append((e, ref, ours, gap, allowed, ok))
        key = attack if attack == "dfme" else f"knockoff-{budget}"
        out[key] = {**table, "faithful": bool(faithful), "checkpoints": len(common)}
        name = {"dfme": "DFME (cake-lab/datafree-model-extraction)",
                "knockoff": f"Knockoff Nets (tribhuvanesh/knockoffnets), budget {budget or 0:,}"}
        lines += [f"## {name[attack]}", "",
                  f"Reference commit `{table['reference']['commit']}`; seeds reference {table['reference']['seeds']}, "
                  f"mtk {table['mtk']['seeds']}. Verdict: **{'faithful' if faithful else 'NOT faithful'}** "
                  f"({sum(r[5] for r in verdict_rows)} of {len(verdict_rows)} checkpoints within noise: |mean gap| "
                  f"<= 2 standard errors of the difference (at least 1 point), or 3 points with one seed a side).", "",
                  "| epoch | queries | reference | mtk | gap (mtk - ref) | allowed | within |", "|---|---|---|---|---|---|---|"]

        def cell(p):
            sd = "" if p["std"] is None else f" ± {100 * p['std']:.2f}"
            return f"{100 * p['mean']:.2f}{sd}"

        for e, ref, ours, gap, allowed, ok in verdict_rows:
            lines.append(f"| {e} | {ref['queries']:,} | {cell(ref)} | {cell(ours)} | {100 * gap:+.2f} | "
                         f"{100 * allowed:.2f} | {'yes' if ok else 'no'} |")
        gaps = [r[3] for r in verdict_rows]
        above = sum(g > 0 for g in gaps)
        lines += ["", f"Mean gap over the checkpoints {100 * float(np.mean(gaps)):+.2f} points; mtk above the reference "
                  f"at {above} of {len(gaps)}. Within noise is what these seeds can tell: a systematic gap smaller "
                  "than the allowed band is not excluded."]
        extra = [k for k in table if k not in ("reference", "mtk")]
        for k in extra:
            pts = table[k]["points"]
            lines += ["", f"For comparison, `{k}` (seeds {table[k]['seeds']}): " + ", ".join(
                f"epoch {e}: {cell(p)}" for e, p in sorted(pts.items())) + "."]
        secs = {k: int(np.mean(v["wall_seconds"])) for k, v in table.items()}
        lines += ["", "Wall time per run (s, mean): " + ", ".join(f"{k} {v}" for k, v in secs.items()), ""]
    lines += ["## DFMS-HL (val-iisc/Hard-Label-Model-Stealing)", "",
              "Not run side by side. Its scripts cannot run here unchanged (CUDA tensors such as "
              "`torch.cuda.LongTensor` in every training step, Python 2's `iterator.next()` on DataLoader iterators, "
              "CIFAR-only loaders and 50,000-sample stages), and a shimmed CPU run is out of reach: its stage 2 alone is 200 "
              "epochs of 90,000 images for a ResNet-18, which trains at ~35 images/s on this CPU "
              "(`../shared/reference/cpu-performance.md`), about 6 days. "
              "What was compared, by reading its code at d2e3010, and aligned as spec fields with the reference value "
              "as default: stages 2-3 batches (128 proxy + 102 generated), pad-crop + flip, SGD 0.1 cosine, stage 3 "
              "from scratch on proxy + DivGAN samples, DivGAN 100 epochs, samples drawn in eval mode, stage 4's "
              "warm-up and cosine. Measured: stage 4's learning rates equal torch's own CosineAnnealingLR run with "
              "the reference's warm-up loop (tests/test_attacks.py). Unmeasured: everything a training run would "
              "show.", ""]
    (OUT.parent / "faithfulness.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out)
    lines += ["![curves](faithfulness.png)", ""]
    (OUT.parent / "faithfulness.md").write_text("\n".join(lines))
    print("\n".join(lines))


def plot(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(out)), figsize=(6 * max(1, len(out)), 4), squeeze=False)
    for ax, (attack, table) in zip(axes[0], out.items()):
        for impl, side in table.items():
            if not isinstance(side, dict):
                continue
            xs = sorted(side["points"])
            ys = [100 * side["points"][e]["mean"] for e in xs]
            err = [100 * (side["points"][e]["std"] or 0) for e in xs]
            color = {"reference": "black", "mtk": "tab:blue"}.get(impl, "tab:red")  # the same colour per side
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=color, label=f"{impl} (seeds {side['seeds']})")
        ax.set_title(f"{attack}: clone test accuracy")
        ax.set_xlabel("epoch" + (" (89,600 queries each)" if attack == "dfme" else " of clone training"))
        if attack != "dfme":
            ax.set_ylim(bottom=max(0, ax.get_ylim()[0]))
        ax.set_ylabel("clone test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT.parent / "faithfulness.png", dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("dfme", "knockoff"):
        p = sub.add_parser(name)
        p.add_argument("--impl", choices=("reference", "mtk"), required=True)
        p.add_argument("--ref", help="the reference checkout (pinned commit)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--victim", default=str(VICTIM))
        if name == "dfme":
            p.add_argument("--epochs", type=int, default=5, help="epochs of 89,600 queries (the 2M schedule's first)")
            p.add_argument("--query-space", default="reference", choices=("reference", "reference-clipped", "unit"))
        else:
            p.add_argument("--cake", help="cake-lab checkout (its LeNet5 is the reference side's clone)")
            p.add_argument("--budget", type=int, default=20000)
            p.add_argument("--query-batch", type=int, default=256)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.what == "report":
        return report(args)
    if args.impl == "reference" and not args.ref:
        parser.error("--ref: the reference checkout is needed")
    {("dfme", "reference"): dfme_reference, ("dfme", "mtk"): dfme_mtk, ("knockoff", "reference"): knockoff_reference,
     ("knockoff", "mtk"): knockoff_mtk}[(args.what, args.impl)](args)


if __name__ == "__main__":
    main()
