"""Atomic training checkpoints: weights of models, optimizer state, RNG state and loop metadata in one file."""

import io
import json
import os
import pathlib

import numpy as np


def atomic_write_bytes(path, data, durable=True):
    """Writes ``path`` whole or not at all (tmp file + rename); ``durable`` also survives a power cut (fsync)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj, durable=True):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), durable)


def save_state(path, models=None, optimizers=None, meta=None, arrays=None):
    """Writes every variable of ``models`` and ``optimizers`` (name -> object), ``meta`` (JSON) and extra numpy
    ``arrays`` (name -> array, read back by ``load_arrays``) atomically."""
    import torch

    arrays = {f"array/{k}": np.asarray(v) for k, v in (arrays or {}).items()}
    for kind, objects in (("model", models or {}), ("opt", optimizers or {})):
        for name, obj in objects.items():
            for i, v in enumerate(obj.variables):
                arrays[f"{kind}/{name}/{i}"] = np.asarray(v.numpy())
    arrays["__torch_rng__"] = torch.get_rng_state().numpy()
    arrays["__meta__"] = np.frombuffer(json.dumps(meta or {}).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path, models=None, optimizers=None):
    """Restores what ``save_state`` wrote; optimizers must be built first. Returns the meta dict."""
    import torch

    with np.load(path) as data:
        for kind, objects in (("model", models or {}), ("opt", optimizers or {})):
            for name, obj in objects.items():
                variables = obj.variables
                stored = [k for k in data.files if k.startswith(f"{kind}/{name}/")]
                if len(stored) != len(variables):
                    raise ValueError(f"{path}: {kind} '{name}' has {len(variables)} variables, checkpoint {len(stored)}")
                for i, v in enumerate(variables):
                    v.assign(data[f"{kind}/{name}/{i}"])
        torch.set_rng_state(torch.from_numpy(data["__torch_rng__"].copy()))
        return json.loads(bytes(data["__meta__"]).decode())


def load_arrays(path):
    """The extra arrays ``save_state`` stored (name -> numpy array)."""
    with np.load(path) as data:
        return {k[len("array/"):]: data[k] for k in data.files if k.startswith("array/")}


def read_meta(path):
    """The meta dict of a state file, without touching any model."""
    with np.load(path) as data:
        return json.loads(bytes(data["__meta__"]).decode())


def resumable(path, fingerprint, discard_stale, what="spec"):
    """Whether the state file at ``path`` belongs to this run (same fingerprint). A foreign one is an error, or
    with ``discard_stale`` (--force) False so the caller starts afresh."""
    from toolkit.errors import UserError

    if read_meta(path).get("fingerprint") == fingerprint:
        return True
    if not discard_stale:
        raise UserError(f"{path}: checkpoint of a different {what}; use --force to discard it, or choose --out")
    return False


def load_weights_only(path, name, model):
    with np.load(path) as data:
        for i, v in enumerate(model.variables):
            v.assign(data[f"model/{name}/{i}"])
