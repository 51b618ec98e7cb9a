"""mtk: defend deployed classifiers against model extraction (MISLEADER, baselines, attacks) on Keras 3 + torch.

Importing the toolkit pins Keras to the PyTorch backend before Keras loads.
"""

from toolkit.backend import configure_keras as _configure_keras

_configure_keras()

__version__ = "0.1.0"
