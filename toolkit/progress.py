"""Progress bars with rate and ETA for every long loop (tqdm: handles terminals, logs and ETA smoothing)."""

import os
import sys

_STATE = {"enabled": os.environ.get("MTK_PROGRESS", "1") != "0"}


def set_enabled(enabled):
    _STATE["enabled"] = bool(enabled)


def bar(total, desc, unit="step", initial=0):
    """A tqdm bar on stderr; disabled by ``set_enabled(False)`` / ``MTK_PROGRESS=0`` (tests, --json)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True,
                disable=not _STATE["enabled"], mininterval=0.5 if sys.stderr.isatty() else 10.0, leave=True)


def log(message):
    if _STATE["enabled"]:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
