"""Target (victim) training from a target spec: cross-entropy, the spec's optimizer/schedule, best-on-validation."""

import pathlib
import time

from toolkit import artifacts, progress
from toolkit.backend import configure_keras, device
from toolkit.data import BatchStream, load_dataset
from toolkit.data.augment import clean_augmentation
from toolkit.models import build_model, count_trainable_params
from toolkit.models.fast import forward
from toolkit.schemas import load_spec, same_spec, spec_hash
from toolkit.training.evaluate import accuracy, model_predictor
from toolkit.training.loop import EpochLoop
from toolkit.training.optim import apply_gradients, make_optimizer, zero_grad

keras = configure_keras()


DRY_RUN_STEPS, DRY_RUN_EVAL = 2, 256


def shrink_for_dry_run(data):
    """Evaluation on the first 256 validation/test images only: a dry run proves the path, it measures nothing."""
    data.val, data.test = data.val.take(slice(0, DRY_RUN_EVAL)), data.test.take(slice(0, DRY_RUN_EVAL))


def default_folder(spec, dry_run=False):
    return pathlib.Path("runs") / "targets" / (spec["name"] + ("-dry-run" if dry_run else ""))


def train_target(spec, out=None, data_root=None, force=False, dry_run=False):
    """Trains (or resumes, or reuses) the target described by ``spec`` (a dict or a path); returns its card.

    ``dry_run`` proves the path cheaply: one epoch of two steps, evaluation on 256 images, its own folder.
    """
    import torch.nn.functional as F

    spec = load_spec(spec, kind="target")
    if dry_run:
        spec["train"].update(epochs=1, steps_per_epoch=DRY_RUN_STEPS)
    folder = pathlib.Path(out) if out else default_folder(spec, dry_run)
    digest = spec_hash(spec)
    card_path = folder / artifacts.CARD
    if card_path.exists() and not force:
        card = artifacts.read_card(folder)
        if same_spec(card, spec, "target"):
            progress.log(f"[{spec['name']}] already trained: {folder} (test acc {card['metrics']['test_acc']:.4f})")
            return {**card, "folder": str(folder)}
        raise artifacts.UserError(f"{folder}: holds a target trained from a different spec; use --force or --out")

    keras.utils.set_random_seed(spec["seed"])
    data = load_dataset(spec["dataset"], data_root)
    data_card = artifacts.dataset_card(data)
    if dry_run:
        shrink_for_dry_run(data)
    train_cfg = spec["train"]
    model = build_model(spec["model"]["architecture"], data.input_shape, data.num_classes, data.mean, data.std,
                        **spec["model"]["options"])
    dev = device()
    stream = BatchStream(data.train, train_cfg["batch_size"], shuffle=True, seed=spec["seed"], device=dev)
    steps = min(len(stream), train_cfg["steps_per_epoch"] or len(stream))
    optimizer = make_optimizer(train_cfg["optimizer"], train_cfg["schedule"], steps, train_cfg["epochs"])
    variables = model.trainable_variables
    optimizer.build(variables)
    augment = clean_augmentation(train_cfg["augment"])
    loop = EpochLoop(folder, spec["name"], train_cfg["epochs"], steps, {"model": model}, {"opt": optimizer},
                     digest, train_cfg["select"], discard_stale=force)
    predict = model_predictor(model, dev)

    def train_epoch(epoch, on_step):
        total, seen, correct = 0.0, 0, 0
        for i, (x, y) in enumerate(stream.epoch(epoch)):
            if i >= steps:
                break
            if augment is not None:
                x = augment(x)
            logits = forward(model, x, training=True)
            loss = F.cross_entropy(logits, y)
            zero_grad(variables)
            loss.backward()
            apply_gradients(optimizer, variables)
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            on_step(loss=total / seen)
        return {"train_loss": total / seen, "train_acc": correct / seen,
                "lr": float(optimizer.mtk_schedule.lr_at_epoch(epoch))}

    def validate():
        return {"val_acc": accuracy(predict, data.val, train_cfg["eval_batch_size"])}

    start = time.time()
    meta = loop.run(train_epoch, validate)
    val_acc = accuracy(predict, data.val, train_cfg["eval_batch_size"])
    test_acc = accuracy(predict, data.test, train_cfg["eval_batch_size"])
    filename = artifacts.save_model(folder, model)
    card = {
        "kind": "target",
        "name": spec["name"],
        "created": artifacts.now(),
        "deployable": {"type": "model", "file": filename},
        "dataset": data_card,
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "architecture": {**spec["model"], "trainable_params": count_trainable_params(model)},
        "metrics": {"val_acc": val_acc, "test_acc": test_acc, "selected_epoch": meta["best"]["epoch"],
                    "selection": train_cfg["select"] + " (validation split, never the test set)"},
        "history": meta["history"],
        "train_seconds": round(meta["elapsed"], 1),
        "wall_seconds_this_run": round(time.time() - start, 1),
        "device": str(dev),
        "seed": spec["seed"],
        "dry_run": dry_run,
        "spec": spec,
        "spec_hash": digest,
        "versions": artifacts.versions(),
    }
    artifacts.write_card(folder, card)
    loop.clear()
    progress.log(f"[{spec['name']}] val acc {val_acc:.4f}, test acc {test_acc:.4f} -> {folder}")
    return {**card, "folder": str(folder)}
