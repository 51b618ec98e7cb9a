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
