"""The one training-loop helper: epochs with a checkpoint after each, resume, progress/ETA, best-on-validation."""

import time

from toolkit import progress
from toolkit.training.checkpoint import load_state, load_weights_only, resumable, save_state


class EpochLoop:
    """Runs ``epochs`` epochs of ``train_epoch``; after each, validates, checkpoints and keeps the best weights.

    Re-running with the same folder resumes after the last finished epoch (same batch order: batches are seeded
    per epoch). ``fingerprint`` guards against resuming a checkpoint written by a different spec.
    """

    def __init__(self, folder, name, epochs, steps_per_epoch, models, optimizers, fingerprint, select="best_val",
                 discard_stale=False):
        self.discard_stale = discard_stale
        self.folder, self.name, self.epochs, self.steps_per_epoch = folder, name, epochs, steps_per_epoch
        self.models, self.optimizers, self.fingerprint, self.select = models, optimizers, fingerprint, select
        self.state_path = folder / "checkpoint" / f"{name}.state.npz"
        self.best_path = folder / "checkpoint" / f"{name}.best.npz"

    def _restore(self):
        fresh = {"next_epoch": 0, "history": [], "best": None, "fingerprint": self.fingerprint, "elapsed": 0.0}
        if not self.state_path.exists():
            return fresh
        if not resumable(self.state_path, self.fingerprint, self.discard_stale):
            progress.log(f"[{self.name}] discarding a checkpoint of a different spec (--force)")
            self.clear()
            return fresh
        meta = load_state(self.state_path, self.models, self.optimizers)
        progress.log(f"[{self.name}] resuming after epoch {meta['next_epoch']}/{self.epochs}")
        return meta

    def run(self, train_epoch, validate):
        """``train_epoch(epoch, step_callback) -> metrics``; ``validate() -> {'val_acc': ..., ...}``."""
        meta = self._restore()
        total = self.epochs * self.steps_per_epoch
        bar = progress.bar(total, f"{self.name}", initial=meta["next_epoch"] * self.steps_per_epoch)
        try:
            for epoch in range(meta["next_epoch"], self.epochs):
                bar.set_description(f"{self.name} epoch {epoch + 1}/{self.epochs}")
                start = time.time()

                def on_step(**metrics):
                    bar.update(1)
                    if metrics:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

                metrics = train_epoch(epoch, on_step)
                metrics.update(validate())
                metrics.update(epoch=epoch + 1, seconds=round(time.time() - start, 2))
                meta["history"].append(metrics)
                best = meta["best"]
                if self.select == "last" or best is None or metrics["val_acc"] > best["val_acc"]:
                    meta["best"] = {"epoch": epoch + 1, "val_acc": metrics["val_acc"]}
                    save_state(self.best_path, self.models, None, {"epoch": epoch + 1})
                meta["next_epoch"] = epoch + 1
                meta["elapsed"] += time.time() - start
                save_state(self.state_path, self.models, self.optimizers, meta)
                progress.log(f"[{self.name}] epoch {epoch + 1}/{self.epochs} " + " ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "seconds")
                    + f" ({metrics['seconds']:.0f}s)")
        finally:
            bar.close()
        for name, model in self.models.items():
            load_weights_only(self.best_path, name, model)
        return meta

    def clear(self):
        """Removes the resumable state once the final artifact is safely written."""
        for path in (self.state_path, self.best_path):
            path.unlink(missing_ok=True)


def fit(folder, name, model, stream, loss_fn, validate, fingerprint, epochs, optimizer, steps=None,
        variables=None, select="best_val", discard_stale=False, extra_models=None):
    """Minimises ``loss_fn(x, y) -> scalar`` over ``variables`` (default: the model's trainable ones) for ``epochs``
    passes of ``stream``, through EpochLoop: resumable per epoch, progress with ETA, best weights on validation.

    The trained defenses share it (surrogates, misinformation models, diverse members, exit heads); ``optimizer``
    comes from ``make_optimizer`` with the same ``steps`` per epoch. The checkpoints stay in ``folder/checkpoint``
    until the caller has written its artifact (then it removes them), so a kill in between loses nothing.
    """
    from toolkit.training.optim import apply_gradients, zero_grad

    variables = list(model.trainable_variables if variables is None else variables)
    optimizer.build(variables)
    steps = min(len(stream), steps or len(stream))
    loop = EpochLoop(folder, name, epochs, steps, {"model": model, **(extra_models or {})}, {"opt": optimizer},
                     fingerprint, select, discard_stale=discard_stale)

    def train_epoch(epoch, on_step):
        total, seen = 0.0, 0
        for i, (x, y) in enumerate(stream.epoch(epoch)):
            if i >= steps:
                break
            loss = loss_fn(x, y)
            zero_grad(variables)
            loss.backward()
            apply_gradients(optimizer, variables)
            total += float(loss.detach()) * len(y)
            seen += len(y)
            on_step(loss=total / seen)
        return {"train_loss": total / max(1, seen), "lr": float(optimizer.mtk_schedule.lr_at_epoch(epoch))}

    return loop.run(train_epoch, validate)  # checkpoints stay until the caller's artifact is written
