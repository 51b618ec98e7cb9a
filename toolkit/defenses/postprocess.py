"""Output postprocessors: what an API does to its probabilities before answering; they compose with any defense.

Each maps a batch of probability rows (N x K torch tensor) to the answered rows, row by row (ART's class-label
postprocessor marks every predicted class in every row of a batch; these never mix rows). A chain is given in a
defense spec's ``postprocess`` list and stored in the card, so a loaded deployable answers through it.
"""

from toolkit.errors import UserError

_POSTPROCESSORS = {}


def register_postprocessor(name):
    def decorate(cls):
        cls.name = name
        _POSTPROCESSORS[name] = cls
        return cls

    return decorate


class Postprocessor:
    """Base class: ``__call__(probs) -> probs``; ``get_config()`` is what the card stores."""

    name = None

    def __init__(self, **config):
        self.config = config

    def get_config(self):
        return {"name": self.name, **self.config}

    def __call__(self, probs):
        raise NotImplementedError


@register_postprocessor("top1")
class Top1Label(Postprocessor):
    """The top-1 label only, as a one-hot row (a hard-label API)."""

    def __call__(self, probs):
        import torch

        return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)


@register_postprocessor("topk")
class TopK(Postprocessor):
    """Keeps the k largest probabilities of each row, zeroes the rest and renormalises (k from the config)."""

    def __call__(self, probs):
        import torch

        k = min(int(self.config.get("k", 1)), probs.shape[1])
        values, index = probs.topk(k, dim=1)
        out = torch.zeros_like(probs).scatter_(1, index, values)
        return out / out.sum(1, keepdim=True).clamp_min(1e-12)


@register_postprocessor("round")
class Rounding(Postprocessor):
    """Rounds each probability to ``decimals`` places (as ART's Rounded); rows no longer sum exactly to 1."""

    def __call__(self, probs):
        import torch

        return torch.round(probs, decimals=int(self.config.get("decimals", 3)))


@register_postprocessor("reverse_sigmoid")
class ReverseSigmoid(Postprocessor):
    """Lee et al.'s reverse sigmoid: y' ∝ y - beta*(sigmoid(gamma*logit(y)) - 1/2), renormalised (beta, gamma)."""

    def __call__(self, probs):
        import torch

        beta, gamma = float(self.config.get("beta", 1.0)), float(self.config.get("gamma", 0.1))
        p = probs.clamp(1e-6, 1 - 1e-6)
        perturbed = p - beta * (torch.sigmoid(gamma * torch.log(p / (1 - p))) - 0.5)
        perturbed = perturbed.clamp_min(0)
        total = perturbed.sum(1, keepdim=True)
        return torch.where(total > 0, perturbed / total.clamp_min(1e-12), probs)


@register_postprocessor("noise")
class GaussianNoise(Postprocessor):
    """Adds N(0, scale²) noise, clips at 0 and renormalises (as ART's GaussianNoise); fresh noise per call."""

    def __call__(self, probs):
        import torch

        noisy = (probs + torch.randn_like(probs) * float(self.config.get("scale", 0.2))).clamp_min(0)
        total = noisy.sum(1, keepdim=True)
        return torch.where(total > 0, noisy / total.clamp_min(1e-12), probs)


def build_postprocessors(configs, source="postprocess"):
    """The chain for a list of ``{"name": ..., options}`` dicts; an unknown name is a one-line error."""
    chain = []
    for i, config in enumerate(configs or []):
        name = config.get("name")
        if name not in _POSTPROCESSORS:
            raise UserError(f"{source}[{i}].name: unknown postprocessor {name!r}; known: "
                            f"{', '.join(sorted(_POSTPROCESSORS))}")
        chain.append(_POSTPROCESSORS[name](**{k: v for k, v in config.items() if k != "name"}))
    return chain

