"""Resumable attack progress: one state file per attack run, written atomically as the attack goes.

An attack saves its models, optimizers, the oracle's query count and its own meta (iteration, curve, RNG states) to
``<run folder>/checkpoint/attack.npz``; re-running the same spec into the same folder continues from there, so a
killed attack loses at most one checkpoint interval and never re-spends (or forgets) a query. The run's wall time is
carried in the checkpoint too, so a cell resumed across sessions reports the time of all its kept work.
"""

import pathlib
import time

from toolkit import progress
from toolkit.training.checkpoint import load_arrays, load_state, resumable, save_state


class AttackState:
    """Checkpoint file of one attack run, guarded by the run's fingerprint (a hash of the threat spec)."""

    def __init__(self, folder, fingerprint, discard_stale=False):
        self.path = pathlib.Path(folder) / "checkpoint" / "attack.npz"
        self.ledger = pathlib.Path(folder) / "checkpoint" / "queries.json"  # the oracle's running count
        self.fingerprint, self.discard_stale = fingerprint, discard_stale
        self.clock, self.previous = time.time(), 0.0

    def seconds(self):
        """Wall seconds of this run so far: earlier runs up to their last checkpoint plus this process's."""
        return self.previous + time.time() - self.clock

    def restore(self, oracle, models, optimizers):
        """Loads the saved state into ``models``/``optimizers``/``oracle``; returns (meta, arrays), or None if fresh."""
        if not self.path.exists():
            if self.ledger.exists():  # a run that spent queries but died before its first checkpoint
                lost = oracle.restore({"queries_used": 0})
                progress.log(f"{lost} queries spent by an earlier run before its first checkpoint stay counted "
                             f"(delete {self.ledger} to pretend otherwise)")
            return None
        if not resumable(self.path, self.fingerprint, self.discard_stale, "threat spec"):
            progress.log(f"discarding {self.path} (different spec, --force)")
            self.clear()
            return None
        meta = load_state(self.path, models, optimizers)
        self.previous = float(meta.get("seconds", 0.0))
        lost = oracle.restore(meta["oracle"])
        progress.log(f"resuming the attack at {oracle.queries_used} of {oracle.budget} queries ({self.path})"
                     + (f"; {lost} queries spent after the last checkpoint stay counted" if lost else ""))
        return meta, load_arrays(self.path)

    def save(self, oracle, models, optimizers, meta, arrays=None):
        save_state(self.path, models, optimizers, {**meta, "fingerprint": self.fingerprint, "oracle": oracle.state(),
                                                   "seconds": self.seconds()}, arrays)

    def clear(self):
        for path in (self.path, self.ledger):
            if path.exists():
                path.unlink()
