"""Time per training step through the toolkit's Keras path vs a plain PyTorch loop doing the same math.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184 \
        .venv/bin/python benchmarks/keras_overhead/run.py

Both sides: same architecture, batch, optimizer (LeNet5: Adam 1e-3, batch 256; ResNet18-8x: SGD 0.1 m 0.9 wd 5e-4,
batch 128), cross-entropy, one backward, one optimizer step, on the same random batches. Rounds alternate the two
sides (interleaved) so machine noise hits both; the ratio is median(keras) / median(torch).
Writes results/keras_overhead.json and results/keras_overhead.md.
"""

import argparse
import json
import pathlib
import statistics
import time

import toolkit  # noqa: F401  (torch backend)
import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.artifacts import versions
from toolkit.models import build_model
from toolkit.models.fast import forward
from toolkit.training.optim import apply_gradients, make_optimizer, zero_grad

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "results"


class TorchLeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5), nn.Conv2d(16, 120, 5)
        self.f1, self.f2 = nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.f2(F.relu(self.f1(F.relu(self.c3(x)).flatten(1))))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


class TorchResNet18(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for i, planes in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(Block(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


CASES = {
    "lenet5": dict(keras_arch="lenet5", torch_net=TorchLeNet5, shape=(1, 32, 32), batch=256,
                   opt={"name": "adam", "lr": 1e-3}),
    "resnet18_8x": dict(keras_arch="resnet18_8x", torch_net=TorchResNet18, shape=(3, 32, 32), batch=128,
                        opt={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
}


def keras_stepper(case):
    model = build_model(case["keras_arch"], case["shape"], 10)
    opt = make_optimizer(case["opt"])
    variables = model.trainable_variables
    opt.build(variables)

    def step(x, y):
        loss = F.cross_entropy(forward(model, x, training=True), y)
        zero_grad(variables)
        loss.backward()
        apply_gradients(opt, variables)

    return step


def torch_stepper(case):
    net = case["torch_net"]()
    o = case["opt"]
    if o["name"] == "adam":
        opt = torch.optim.Adam(net.parameters(), o["lr"])
    else:
        opt = torch.optim.SGD(net.parameters(), o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    net.train()

    def step(x, y):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(step, batches):
    times = []
    for x, y in batches:
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return times


def run_case(name, rounds, steps, warmup):
    case = CASES[name]
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(case["batch"], *case["shape"], generator=gen),
                torch.randint(0, 10, (case["batch"],), generator=gen)) for _ in range(steps)]
    sides = {"keras": keras_stepper(case), "torch": torch_stepper(case)}
    for step in sides.values():
        time_steps(step, batches[:warmup])
    samples = {"keras": [], "torch": []}
    for r in range(rounds):
        order = ("keras", "torch") if r % 2 == 0 else ("torch", "keras")
        for side in order:
            samples[side] += time_steps(sides[side], batches)
    med = {side: statistics.median(v) for side, v in samples.items()}
    return {"case": name, "batch": case["batch"], "steps_per_side": len(samples["keras"]),
            "keras_ms": round(med["keras"] * 1e3, 2), "torch_ms": round(med["torch"] * 1e3, 2),
            "ratio": round(med["keras"] / med["torch"], 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=None, help="steps per side per round")
    parser.add_argument("--out", default=str(RESULTS / "keras_overhead"))
    args = parser.parse_args()
    import os

    rows = []
    for name in args.cases:
        steps = args.steps or (20 if name == "lenet5" else 3)
        row = run_case(name, args.rounds, steps, warmup=min(3, steps))
        print(json.dumps(row), flush=True)
        rows.append(row)
    record = {"benchmark": "keras_overhead", "command": "python benchmarks/keras_overhead/run.py",
              "threads": torch.get_num_threads(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "target_ratio": 1.15, "results": rows, "versions": versions()}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Keras-path overhead per training step (this CPU)", "",
             f"Command: `{record['command']}` (torch threads {record['threads']}, GLIBC_TUNABLES "
             f"{'set' if record['glibc_tunables'] else 'unset'}). Median over interleaved rounds.", "",
             "| model | batch | toolkit Keras ms/step | plain torch ms/step | ratio | target |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['batch']} | {r['keras_ms']} | {r['torch_ms']} | {r['ratio']} | <= 1.15 |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
