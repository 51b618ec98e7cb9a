"""Batched inference and accuracy of Keras classifiers on in-memory splits."""

import numpy as np

from toolkit.data.batches import to_float_tensor
from toolkit.models.fast import forward


def accuracy(predict, split, batch_size=1024):
    """Top-1 accuracy of ``predict`` (images -> scores) on a Split."""
    import torch

    if len(split) == 0:
        return float("nan")
    correct = 0
    for i in range(0, len(split), batch_size):
        scores = predict(split.x[i:i + batch_size])
        correct += int((torch.as_tensor(scores).argmax(1).cpu() == torch.as_tensor(split.y[i:i + batch_size])).sum())
    return correct / len(split)


def agreement(predict_a, predict_b, x, batch_size=1024):
    """Fraction of inputs on which two predictors give the same top-1 class."""
    import torch

    same = 0
    for i in range(0, len(x), batch_size):
        a = torch.as_tensor(predict_a(x[i:i + batch_size])).argmax(1).cpu()
        b = torch.as_tensor(predict_b(x[i:i + batch_size])).argmax(1).cpu()
        same += int((a == b).sum())
    return same / max(1, len(x))


def model_predictor(model, device=None):
    """images -> logits for a Keras model, in inference mode."""
    import torch

    def predict(x):
        with torch.no_grad():
            return forward(model, to_float_tensor(np.asarray(x) if not torch.is_tensor(x) else x, device), False)

    return predict
