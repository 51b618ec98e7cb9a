"""What the trained baselines share: models shaped like the target, OOD batches, entropy, and one training call.

Each trained baseline (misinformation, edm, dnf, meco, act) lives in its own module with its loss and its deployable;
this module keeps them from re-implementing the plumbing.
"""

import pathlib

import numpy as np
import torch

from toolkit.data import BatchStream
from toolkit.data.batches import to_float_tensor
from toolkit.data.registry import images_like
from toolkit.models import build_model
from toolkit.schemas import spec_hash
from toolkit.training.evaluate import accuracy, model_predictor
from toolkit.training.loop import fit
from toolkit.training.optim import make_optimizer


def like_target(target_card, teacher, data, name, init="target"):
    """A model of the target's architecture: a copy of its weights (init 'target') or freshly initialised."""
    arch = target_card["architecture"]
    model = build_model(arch["architecture"], data.input_shape, data.num_classes, data.mean, data.std, name=name,
                        **(arch.get("options") or {}))
    if init == "target":
        model.set_weights(teacher.get_weights())
    return model


class OODBatches:
    """Endless batches of out-of-distribution images (float, on the training device), reproducible per step."""

    def __init__(self, spec, input_shape, data_root, batch_size, dry_run=False):
        cfg = spec["train"]
        used = batch_size * (cfg["steps_per_epoch"] or 10**9) * cfg["epochs"]  # more than training draws is waste
        size = 512 if dry_run else min(20000, used)
        self.x = torch.as_tensor(images_like(spec["ood"], input_shape, data_root, ("train",), size, spec["seed"],
                                             what="$.ood"))
        self.batch_size, self.seed, self.step = batch_size, spec["seed"], 0

    def next(self):
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        return to_float_tensor(self.x[torch.as_tensor(rng.integers(0, len(self.x), self.batch_size))])


def training_card(data):
    """The card a deployable needs while its defense is still training (validation answers go through it)."""
    return {"dataset": {"num_classes": data.num_classes}}


def entropy(logits):
    """Mean Shannon entropy (nats) of softmax(logits) over the batch."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()


def train(folder, name, spec, data, model, loss_fn, dry_run=False, force=False, variables=None, extra_models=None,
          predict=None, config=None, select="best_val"):
    """Trains ``model`` (and ``extra_models``) with ``loss_fn(x, y)`` under the spec's ``train`` settings, resumable
    per epoch in ``folder/checkpoint``; keeps the weights best on validation accuracy of ``predict`` (or the last)."""
    cfg = spec["train"]
    stream = BatchStream(data.train, cfg["batch_size"], shuffle=True, seed=spec["seed"], drop_last=True)
    steps = 2 if dry_run else min(len(stream), cfg["steps_per_epoch"] or len(stream))
    epochs = 1 if dry_run else cfg["epochs"]
    optimizer = make_optimizer(cfg["optimizer"], cfg["schedule"], steps, epochs)
    predict = predict or model_predictor(model)
    fingerprint = spec_hash({"name": name, "train": cfg, "config": config, "seed": spec["seed"], "ood": spec["ood"],
                             "data": data.fingerprint(), "dry_run": dry_run})
    return fit(pathlib.Path(folder), name, model, stream, loss_fn, lambda: {"val_acc": accuracy(predict, data.val)},
               fingerprint, epochs, optimizer, steps=steps, variables=variables, select=select,
               discard_stale=force, extra_models=extra_models)
