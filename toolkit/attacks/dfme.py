"""DFME (Truong et al., CVPR 2021), soft-label data-free extraction, after cake-lab's ``dfme/train.py``.

Per iteration: one generator step — the gradient of the clone/victim L1 disagreement w.r.t. the generator's
(pre-tanh) images is estimated by forward differences along ``m`` random unit directions (B*(m+1) queries) and
back-propagated into the generator — then ``d_iter`` clone steps on fresh generated batches (B queries each), L1
between the clone's logits and the victim's logits recovered from its probabilities as log(p) minus its mean.

Query space (``query_space``): cake-lab feeds the generator's tanh to the victim as an already-normalised input, i.e.
pixel = mean + std * tanh ('reference'; MNIST -0.18..0.44, so only an in-process victim can take it);
'reference-clipped' clips those pixels to [0, 1], what an image API can receive; 'unit' is (tanh + 1) / 2, the
mapping mtk used before (images centred on grey), kept to compare. Faithfulness: results/faithfulness.md.
"""

from toolkit import progress
from toolkit.models.fast import forward
from toolkit.oracle import BudgetExhausted, recover_logits
from toolkit.training.optim import apply_gradients, make_optimizer, zero_grad

def resolve(cfg, preset):
    """The dfme block with the preset's values where the block leaves them null."""
    if preset not in PRESETS:
        from toolkit.errors import UserError

        raise UserError(f"unknown dfme preset '{preset}'; known: {', '.join(PRESETS)}")
    return {**cfg, **{k: v for k, v in PRESETS[preset].items() if cfg.get(k) is None}}


PRESETS = {
    "canonical": {"batch_size": 256, "lr_G": 1e-4, "grad_m": 1, "grad_epsilon": 1e-3},
    "misleader-released": {"batch_size": 2048, "lr_G": 1e-5, "grad_m": 1, "grad_epsilon": 1e-3},
}


def victim_targets(answers, released_prob_as_logit=False):
    """The victim's logits as the clone's L1 target.

    Canonical: log(p) - mean(log p), the logits up to the constant softmax discards. The released MISLEADER code
    applied log_softmax to the averaged probabilities as if they were logits (a flaw kept only to compare numbers).
    """
    import torch

    if released_prob_as_logit:
        z = torch.log_softmax(answers, dim=1)
        return z - z.mean(dim=1, keepdim=True)
    return recover_logits(answers)


QUERY_SPACES = ("reference", "reference-clipped", "unit")


def pixels(pre, query_space, mean, std):
    """The generator's pre-tanh output as the pixels sent to the oracle (see the module docstring)."""
    import torch

    t = torch.tanh(pre)
    if query_space == "unit":
        return (t + 1) / 2
    shape = (1, -1) + (1,) * (t.ndim - 2)
    x = torch.as_tensor(mean, dtype=t.dtype).view(shape) + torch.as_tensor(std, dtype=t.dtype).view(shape) * t
    return x.clamp(0, 1) if query_space == "reference-clipped" else x


class DFMEAttack:
    """Cake-lab's DFME loop through an ``Oracle``; the clone and generator are Keras models trained in place.

    ``mean``/``std`` are the victim's normalisation statistics, which the reference query space needs.
    """

    def __init__(self, oracle, clone, generator, cfg, mean=None, std=None):
        self.oracle, self.clone, self.generator, self.cfg = oracle, clone, generator, cfg
        self.mean, self.std = mean, std
        if cfg["query_space"] != "unit" and (mean is None or std is None):
            raise ValueError(f"dfme query space {cfg['query_space']!r} needs the victim's normalisation statistics")
        self.check = []
        b, m, d = cfg["batch_size"], cfg["grad_m"], cfg["d_iter"]
        self.cost = b * (cfg["g_iter"] * (m + 1) + d)
        # The schedule spans schedule_budget's iterations (default: the budget's); a smaller budget truncates the run.
        schedule_iterations = (cfg.get("schedule_budget") or oracle.budget) // self.cost
        self.epochs = schedule_iterations // cfg["epoch_itrs"] + 1
        steps = [int(s * self.epochs) for s in cfg["lr_steps"]]
        # cake-lab steps MultiStepLR *before* each epoch: its rates are one epoch ahead, and a milestone at 0 applies
        # from the start; 'after_epoch' is the usual torch order (mtk's earlier behaviour).
        before = cfg["scheduler_step"] == "before_epoch"
        schedule = {"name": "multistep", "milestones": steps if before else [max(1, s) for s in steps],
                    "gamma": cfg["lr_scale"], "offset": 1 if before else 0}
        self.opt_s = make_optimizer({"name": "sgd", "lr": cfg["lr_S"], "momentum": cfg["momentum"],
                                     "weight_decay": cfg["weight_decay"]}, schedule, cfg["epoch_itrs"] * d, self.epochs)
        self.opt_g = make_optimizer({"name": "adam", "lr": cfg["lr_G"]}, schedule,
                                    cfg["epoch_itrs"] * cfg["g_iter"], self.epochs)
        self.opt_s.build(clone.trainable_variables)
        self.opt_g.build(generator.trainable_variables)

    def _images(self, pre):
        return pixels(pre, self.cfg["query_space"], self.mean, self.std)

    def _z(self):
        import torch

        return torch.randn(self.cfg["batch_size"], self.cfg["nz"])

    def generator_step(self):
        import torch
        import torch.nn.functional as F

        cfg, oracle = self.cfg, self.oracle
        m, eps = cfg["grad_m"], cfg["grad_epsilon"]
        g_vars = self.generator.trainable_variables
        pre = forward(self.generator, self._z(), True)
        n, c, h, w = pre.shape
        dim = c * h * w
        with torch.no_grad():
            u = torch.randn(n, m, dim)
            u = (u / u.norm(dim=2, keepdim=True)).view(n, m, c, h, w)
            u = torch.cat([u, torch.zeros(n, 1, c, h, w)], 1)
            points = self._images((pre.detach().unsqueeze(1) + eps * u).view(-1, c, h, w))
            targets = victim_targets(oracle.query(points), cfg["released_prob_as_logit"])
            clone_out = forward(self.clone, points, False)
            loss_values = -F.l1_loss(clone_out, targets, reduction="none").mean(1).view(n, m + 1)
            diffs = (loss_values[:, :-1] - loss_values[:, -1:]).view(n, m, 1, 1, 1)
            grad = (diffs * u[:, :-1] / eps * dim).mean(1) / (oracle.num_classes * n)
        zero_grad(g_vars)
        pre.backward(grad)
        apply_gradients(self.opt_g, g_vars)
        return float(loss_values[:, -1].mean())

    def clone_step(self):
        import torch
        import torch.nn.functional as F

        s_vars = self.clone.trainable_variables
        with torch.no_grad():
            x = self._images(forward(self.generator, self._z(), True))
            targets = victim_targets(self.oracle.query(x), self.cfg["released_prob_as_logit"])
        out = forward(self.clone, x, True)
        # Attacker-side check, free: agreement with the victim on queries the clone has not trained on yet.
        self.check.append(float((out.detach().argmax(1) == targets.argmax(1)).float().mean()))
        loss = F.l1_loss(out, targets)
        zero_grad(s_vars)
        loss.backward()
        apply_gradients(self.opt_s, s_vars)
        return float(loss.detach())

    def _models(self):
        return {"clone": self.clone, "generator": self.generator}, {"clone": self.opt_s, "generator": self.opt_g}

    def run(self, state=None, checkpoint_every=None, progress_every=None, evaluate=None):
        """Iterates until the budget cannot pay for another iteration; returns the accuracy-vs-queries curve.

        ``state`` (an ``AttackState``) resumes a killed run and is saved every ``checkpoint_every`` queries;
        ``evaluate(clone)`` (reporting only) adds test metrics to the curve every ``progress_every`` queries.
        """
        import collections

        models, optimizers = self._models()
        it, curve = 0, []
        if state is not None and (saved := state.restore(self.oracle, models, optimizers)) is not None:
            it, curve = saved[0]["iteration"], saved[0]["curve"]
        self.check = collections.deque(maxlen=max(1, 1024 // self.cfg["batch_size"]) * self.cfg["d_iter"])
        point_every = max(1, (progress_every or self.oracle.budget) // self.cost)
        save_every = max(1, (checkpoint_every or self.oracle.budget) // self.cost)

        def point():
            check = sum(self.check) / len(self.check) if self.check else None
            out = {"queries": self.oracle.queries_used, "iteration": it, "attacker_check_agreement": check}
            return {**out, **(evaluate(self.clone) if evaluate else {})}

        bar = progress.bar(self.oracle.budget, "dfme queries", unit="q", initial=self.oracle.queries_used)
        try:
            while self.oracle.remaining >= self.cost:
                for _ in range(self.cfg["g_iter"]):
                    g_loss = self.generator_step()
                for _ in range(self.cfg["d_iter"]):
                    s_loss = self.clone_step()
                it += 1
                bar.update(self.cost)
                bar.set_postfix(loss_S=f"{s_loss:.3f}", loss_G=f"{g_loss:.3f}",
                                check=f"{sum(self.check) / len(self.check):.3f}", refresh=False)
                if it % point_every == 0:
                    curve.append(point())
                    progress.log(f"[dfme] {self.oracle.queries_used}/{self.oracle.budget} queries: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in curve[-1].items() if isinstance(v, float)))
                if state is not None and it % save_every == 0:
                    state.save(self.oracle, models, optimizers, {"iteration": it, "curve": curve})
        except BudgetExhausted:
            pass
        finally:
            bar.close()
        if not curve or curve[-1]["queries"] != self.oracle.queries_used:
            curve.append(point())
        if state is not None:
            state.save(self.oracle, models, optimizers, {"iteration": it, "curve": curve, "finished": True})
        return curve
