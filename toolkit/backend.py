"""Pins Keras to the PyTorch backend before Keras is imported, and picks the device.

The toolkit's models and custom training steps are written for Keras 3 on torch; any other backend (whatever
``KERAS_BACKEND`` or ``~/.keras/keras.json`` say) is overridden here, and a Keras already loaded on another backend is
a clear error rather than a silent mix.
"""

import os
import sys

from toolkit.errors import UserError

BACKEND = "torch"


def configure_keras():
    """Sets the torch backend and channels-first images; returns the ``keras`` module."""
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != BACKEND:
            raise UserError(
                f"Keras was already imported on the '{keras.backend.backend()}' backend; mtk needs 'torch'. "
                "Import toolkit before keras, or set KERAS_BACKEND=torch."
            )
    else:
        os.environ["KERAS_BACKEND"] = BACKEND
        import keras
    # NCHW goes straight to F.conv2d on torch (no per-call permutes); every toolkit layer also passes it explicitly.
    keras.config.set_image_data_format("channels_first")
    return keras


def device():
    """The torch device Keras places variables on: CUDA when present, else CPU."""
    import torch

    forced = os.environ.get("KERAS_TORCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
