"""Saved deployables: a folder with ``card.json`` and ``.keras`` model files, loaded back by one call.

Every victim an attack or a report sees (an undefended target, one MISLEADER member, an ensemble, a baseline) is a
``Deployable`` from ``load_deployable(folder)``: ``predict_proba(x)`` on [0, 1] NCHW pixels, nothing else.
"""

import datetime
import json
import pathlib
import platform

from toolkit.errors import UserError
from toolkit.training.checkpoint import atomic_write_json

CARD = "card.json"
_LOADERS = {}


def register_deployable(type_name):
    """Decorator: ``loader(folder, card) -> Deployable`` for cards whose deployable.type is ``type_name``."""

    def decorate(loader):
        _LOADERS[type_name] = loader
        return loader

    return decorate


class Deployable:
    """What an API serves. Subclasses implement ``_proba(x_float_tensor) -> probabilities``."""

    def __init__(self, card, folder=None):
        self.card, self.folder = card, folder
        self._chain = None  # the card's output postprocessors, built on first use

    @property
    def input_shape(self):
        return tuple(self.card["dataset"]["input_shape"])

    @property
    def num_classes(self):
        return int(self.card["dataset"]["num_classes"])

    def predict_proba(self, x, batch_size=1024):
        """Class probabilities (detached float32 torch tensor, N x K) for images in [0, 1] (or uint8)."""
        import torch

        from toolkit.data.batches import to_float_tensor

        if self._chain is None:
            from toolkit.defenses.postprocess import build_postprocessors

            self._chain = build_postprocessors(self.card.get("deployable", {}).get("postprocess"),
                                               "card.json: $.deployable.postprocess")
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                probs = self._proba(to_float_tensor(x[i:i + batch_size])).float()
                for post in self._chain:
                    probs = post(probs)
                outs.append(probs)
        return torch.cat(outs) if outs else torch.zeros((0, self.num_classes))

    def _proba(self, x):
        raise NotImplementedError


class ModelDeployable(Deployable):
    """A single Keras classifier (target or member): softmax of its logits."""

    def __init__(self, model, card, folder=None):
        super().__init__(card, folder)
        self.model = model

    def _proba(self, x):
        import torch

        from toolkit.models.fast import forward

        return torch.softmax(forward(self.model, x, False), dim=1)


def load_keras_model(path):
    """Loads a ``.keras`` file in safe mode (no pickles, no lambdas) with the toolkit's layers registered."""
    import keras

    import toolkit.data.augment  # noqa: F401  (registers layers)
    import toolkit.models.layers  # noqa: F401
    import toolkit.training.optim  # noqa: F401  (registers EpochSchedule)

    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: model file not found")
    return keras.saving.load_model(path, compile=False, safe_mode=True)


@register_deployable("model")
def _load_model(folder, card):
    return ModelDeployable(load_keras_model(folder / card["deployable"]["file"]), card, folder)


def read_card(folder):
    folder = pathlib.Path(folder)
    path = folder / CARD
    if not path.exists():
        raise UserError(f"{folder}: not an mtk artifact (no {CARD})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg})") from None


def load_deployable(folder):
    """The deployable in an artifact folder, whatever it is (target, member, ensemble, baseline)."""
    folder = pathlib.Path(folder)
    return deployable_from_card(folder, read_card(folder))


def deployable_from_card(folder, card):
    """The deployable a card describes (its files in ``folder``), before or after the card is written."""
    kind = card.get("deployable", {}).get("type")
    if kind not in _LOADERS:
        _import_plugins()
    if kind not in _LOADERS:
        raise UserError(f"{folder / CARD}: $.deployable.type: unknown deployable type {kind!r}")
    return _LOADERS[kind](folder, card)


def _import_plugins():
    import importlib

    for module in ("toolkit.defenses",):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def save_model(folder, model, filename="model.keras"):
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{filename}.tmp.keras"
    model.save(tmp)
    tmp.replace(folder / filename)
    return filename


def copy_model_file(src_folder, card, dst_folder):
    """Copies the model file a card names into another artifact folder; returns its file name."""
    import shutil

    filename = card["deployable"]["file"]
    shutil.copyfile(pathlib.Path(src_folder) / filename, pathlib.Path(dst_folder) / filename)
    return filename


def write_card(folder, card):
    atomic_write_json(pathlib.Path(folder) / CARD, card)


def versions():
    import keras
    import numpy
    import torch
    import torchvision

    import toolkit

    return {"mtk": toolkit.__version__, "keras": keras.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


_DERIVED_DATA_KEYS = ("input_shape", "num_classes", "classes", "sizes", "fingerprint")


def dataset_config(card):
    """The dataset spec block a card was made from (``dataset_card`` minus what it derived)."""
    return {k: v for k, v in card["dataset"].items() if k not in _DERIVED_DATA_KEYS}


def dataset_card(dataset):
    """What a card records about the data: the spec block, shapes, classes, stats and a content fingerprint."""
    return {**dataset.config, "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
            "classes": dataset.classes, "sizes": {s: len(dataset.split(s)) for s in ("train", "val", "holdout", "test")},
            "fingerprint": dataset.fingerprint()}
