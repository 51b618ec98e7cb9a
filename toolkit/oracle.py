"""The black-box boundary between every attack and every victim.

An attack holds an ``Oracle`` and nothing else of the victim: ``query(x)`` returns what an API returns
(probabilities, top-k/rounded probabilities, or top-1 labels) as fresh tensors with no autograd path, and counts every
input row against the budget — labelling, validation and gradient-estimation queries alike. A request that would
overspend the budget is refused whole with ``BudgetExhausted``, so an attack stops cleanly at the budget.
"""

from toolkit.errors import UserError


class BudgetExhausted(Exception):
    """The query budget cannot cover this request; nothing was answered or counted."""


class Oracle:
    """Answers queries on [0, 1] NCHW images like a deployed API, counting queries.

    ``victim`` is anything with ``predict_proba(x)`` and ``input_shape`` (a deployable, or a remote client). It is
    kept in a closure, not an attribute, so attack code cannot reach weights, logits or gradients by accident.
    """

    def __init__(self, victim, budget, output="soft", top_k=None, round=None, ledger=None, accept_out_of_range=False):
        if output not in ("soft", "hard"):
            raise UserError(f"oracle output must be 'soft' or 'hard', got {output!r}")
        if budget is None or budget < 1:
            raise UserError(f"query budget must be a positive integer, got {budget!r}")
        self.budget, self.output, self.top_k, self.round = int(budget), output, top_k, round
        self.accept_out_of_range = bool(accept_out_of_range)  # in-process victims only (the reference DFME space)
        self.input_shape = tuple(int(d) for d in victim.input_shape)
        self.num_classes = int(victim.num_classes)
        self.queries_used = 0
        self.queries_lost = 0  # paid for by a run killed after its last checkpoint: counted, never learned from
        self.ledger = ledger  # optional file with the running count, so queries spent before a crash stay spent

        def answer(x):
            return victim.predict_proba(x)

        self._answer = answer

    @property
    def remaining(self):
        return self.budget - self.queries_used

    def query(self, x):
        """API outputs for a batch ``x`` (N x C x H x W, finite, in [0, 1] unless ``accept_out_of_range``); N queries
        are counted."""
        import torch

        x = self._check(x)
        n = int(x.shape[0])
        if n > self.remaining:
            raise BudgetExhausted(f"{n} queries requested, {self.remaining} of {self.budget} left")
        with torch.no_grad():
            proba = self._answer(x.detach().clone()).detach().float()
        self.queries_used += n
        if self.ledger is not None:
            from toolkit.training.checkpoint import atomic_write_json

            atomic_write_json(self.ledger, {"queries_used": self.queries_used, "budget": self.budget}, durable=False)
        return self._postprocess(proba).to(x.device)

    def _check(self, x):
        import numpy as np
        import torch

        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not torch.is_tensor(x):
            raise UserError(f"oracle query must be an array of images, got {type(x).__name__}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if not x.is_floating_point():
            raise UserError(f"oracle query must hold float pixels in [0, 1] (or uint8), got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise UserError(f"oracle query must have shape (N, {', '.join(map(str, self.input_shape))}), "
                            f"got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise UserError("oracle query is empty")
        x = x.detach()
        if not torch.isfinite(x).all():
            raise UserError("oracle query holds NaN or infinite pixels")
        if not self.accept_out_of_range and (float(x.min()) < 0 or float(x.max()) > 1):
            raise UserError(f"oracle query pixels must lie in [0, 1], got {float(x.min()):.3g}..{float(x.max()):.3g}")
        return x.float()

    def _postprocess(self, proba):
        import torch

        if self.output == "hard":
            return proba.argmax(1)
        if self.top_k is not None and self.top_k < proba.shape[1]:
            kth = proba.topk(self.top_k, dim=1).values[:, -1:]
            proba = torch.where(proba >= kth, proba, torch.zeros_like(proba))
            proba = proba / proba.sum(1, keepdim=True)
        if self.round is not None:
            scale = 10.0 ** self.round
            proba = torch.round(proba * scale) / scale
        return proba.clone()

    def state(self):
        """What a checkpoint needs to resume the count."""
        return {"queries_used": self.queries_used, "budget": self.budget, "queries_lost": self.queries_lost}

    def restore(self, state):
        """Resumes the count from a checkpoint, or from the ledger when queries were spent after it; returns the queries
        so lost (also added to ``queries_lost``)."""
        import json
        import pathlib

        self.queries_used = int(state["queries_used"])
        if self.ledger is not None and pathlib.Path(self.ledger).exists():
            spent = int(json.loads(pathlib.Path(self.ledger).read_text())["queries_used"])
            self.queries_used = max(self.queries_used, spent)
        lost = self.queries_used - int(state["queries_used"])
        self.queries_lost = int(state.get("queries_lost", 0)) + lost
        return lost


def recover_logits(proba, eps=1e-12):
    """Centred log-probabilities: logits up to the per-sample constant softmax discards (the honest recovery)."""
    import torch

    logp = torch.log(proba.clamp_min(eps))
    return logp - logp.mean(dim=1, keepdim=True)
