"""The one registry of architectures: a name in a spec becomes a Keras model taking [0, 1] pixels (NCHW)."""

import dataclasses
import difflib

from toolkit.backend import configure_keras
from toolkit.errors import UserError

keras = configure_keras()

_ARCHITECTURES = {}


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    body: callable  # body(x, num_classes, **options) -> logits
    min_size: int
    max_size: int
    doc: str


def register_architecture(name, min_size=8, max_size=None):
    """Decorator: registers ``body(x, num_classes, **options)`` under ``name``."""

    def decorate(body):
        _ARCHITECTURES[name] = Architecture(name, body, min_size, max_size, (body.__doc__ or "").strip())
        return body

    return decorate


def available_architectures():
    _load_builtin()
    return sorted(_ARCHITECTURES)


def get_architecture(name):
    _load_builtin()
    if name not in _ARCHITECTURES:
        close = difflib.get_close_matches(name, _ARCHITECTURES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown architecture '{name}'{hint}; known: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[name]


def build_model(architecture, input_shape, num_classes, mean=None, std=None, name=None, **options):
    """Builds ``architecture`` for ``input_shape`` = (C, H, W) and ``num_classes``.

    With ``mean``/``std`` the model standardises its input itself, so it takes raw [0, 1] pixels; it returns logits.
    """
    from toolkit.models.layers import Standardize

    arch = get_architecture(architecture)
    channels, height, width = (int(d) for d in input_shape)
    size = min(height, width)
    if size < arch.min_size or (arch.max_size and max(height, width) > arch.max_size):
        allowed = f"{arch.min_size}" if arch.max_size == arch.min_size else f">= {arch.min_size}"
        raise UserError(f"architecture '{architecture}' needs {allowed} pixel inputs, got {height}x{width}")
    if num_classes < 2:
        raise UserError(f"num_classes must be >= 2, got {num_classes}")
    inputs = keras.Input(shape=(channels, height, width), name="pixels")
    x = inputs
    if mean is not None:
        x = Standardize(mean, std, name="standardize")(x)
    logits = arch.body(x, num_classes, **options)
    return keras.Model(inputs, logits, name=name or architecture)


def count_trainable_params(model):
    return int(sum(int(w.numpy().size) for w in model.trainable_weights))


def _load_builtin():
    # Importing the modules runs their @register_architecture decorators.
    from toolkit.models import densenet, lenet, mobilenet_v2, resnet_8x  # noqa: F401
