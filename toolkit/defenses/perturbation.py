"""Output-perturbation defenses: the API answers y' near the target's y, within an L1 budget ||y' - y||_1 <= eps.

- ``randp`` (Orekondy et al.): y' = (1 - eps/2) y + (eps/2) e_k, k uniform among the non-top-1 classes.
- ``p-poison`` (MAD, Orekondy et al. ICLR 2020): a one-hot y* that most deflects the gradient an attacker's
  (randomly initialised) surrogate would take, then a line search to the budget.
- ``grad`` (GRAD², Mazeika et al. ICML 2022): the exact gradient of <g(y'), t> in y' (g: the distilled surrogate's
  parameter gradient under soft labels y') and the closed-form L1-ball-and-simplex step that minimises it.

All work on whole query batches (the originals loop over samples). Each has an ``argmax`` variant that never changes
the top-1 class: at eps = 1 the originals flip the top-1 of every confident answer (RandP always), and utility with it.
"""

import pathlib

import torch

from toolkit.artifacts import Deployable, load_keras_model, register_deployable, save_model

_TINY = 1e-12


def argmax_cap(y, y_star):
    """Largest a in [0, 1] per row with argmax((1 - a) y + a y*) = argmax(y) (ties count as a change)."""
    top = y.argmax(1, keepdim=True)
    d = y.gather(1, top) - y  # >= 0
    e = y_star.gather(1, top) - y_star
    slope = e - d
    bound = torch.where(slope < 0, d / (-slope).clamp_min(_TINY), torch.full_like(d, float("inf")))
    bound.scatter_(1, top, float("inf"))
    return bound.min(1).values.clamp(0, 1) * (1 - 1e-4)


def mix_to_budget(y, y_star, epsilon, preserve_argmax=False):
    """y' = (1 - a) y + a y* with a = min(1, eps / ||y - y*||_1) (the line search), capped to keep the top-1."""
    distance = (y - y_star).abs().sum(1)
    a = (epsilon / distance.clamp_min(_TINY)).clamp(0, 1)
    if preserve_argmax:
        a = torch.minimum(a, argmax_cap(y, y_star))
    return (1 - a[:, None]) * y + a[:, None] * y_star


class RandomPerturbation:
    """RandP: mix towards a random non-top-1 vertex with weight eps/2 (L1 change eps*(1 - y_k) <= eps)."""

    def __init__(self, epsilon, variant="original", seed=0):
        self.epsilon, self.variant = float(epsilon), variant
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, x, y):
        n, k = y.shape
        top = y.argmax(1)
        # uniform over the k - 1 classes other than the top-1: draw in [0, k-1) and skip the top index
        draw = torch.randint(0, k - 1, (n,), generator=self.generator).to(y.device)
        target = draw + (draw >= top).long()
        y_star = torch.nn.functional.one_hot(target, k).to(y.dtype)
        a = torch.full((n,), self.epsilon / 2, dtype=y.dtype, device=y.device).clamp(0, 1)
        if self.variant == "argmax":
            a = torch.minimum(a, argmax_cap(y, y_star))
        return (1 - a[:, None]) * y + a[:, None] * y_star


class MAD:
    """P-poison / MAD with the surrogate's last-layer gradients, batched in closed form.

    For a dense last layer z = W h + b, the gradient of -log softmax(z)_k in W is (p - e_k) h^T (p: the surrogate's
    probabilities), so G^T v = -(v - (sum v) p) h^T for any v. Hence the 'extreme' objective
    ||G^T (y* - y)||^2 = ||y* - y||^2 ||h||^2 and the 'angular' one, the distance between the unit directions of
    G^T y* = (p - y*) h^T and G^T y = (p - y) h^T, equals 2 - 2 cos(p - y*, p - y): both need p only, for every
    vertex of the simplex at once (tests check them against autograd on a real model).
    """

    def __init__(self, surrogate, epsilon, variant="original", oracle="extreme"):
        self.surrogate, self.epsilon, self.variant, self.oracle = surrogate, float(epsilon), variant, oracle

    def objective(self, p, y, y_star):
        """Per row and candidate: the deflection of y_star (N x C x K) from y (N x K); higher is better."""
        if self.oracle == "extreme":
            return ((y_star - y[:, None, :]) ** 2).sum(2)
        u = p[:, None, :] - y_star
        v = (p - y)[:, None, :]
        cos = (u * v).sum(2) / (u.norm(dim=2) * v.norm(dim=2)).clamp_min(_TINY)
        return 2 - 2 * cos

    def __call__(self, x, y):
        from toolkit.models.fast import forward

        n, k = y.shape
        p = torch.softmax(forward(self.surrogate, x, False).float(), dim=1)
        vertices = torch.eye(k, dtype=y.dtype, device=y.device).expand(n, k, k)
        if self.variant == "argmax":
            # score each vertex by where the budget-and-top-1-capped line search actually lands
            candidates = torch.stack([mix_to_budget(y, vertices[:, j], self.epsilon, True) for j in range(k)], 1)
            best = self.objective(p, y, candidates).argmax(1)
            return candidates[torch.arange(n), best]
        best = self.objective(p, y, vertices).argmax(1)
        return mix_to_budget(y, torch.nn.functional.one_hot(best, k).to(y.dtype), self.epsilon)


class GradientRedirection:
    """GRAD²: minimise <g(y'), t> over the L1 ball of radius eps around y, intersected with the simplex.

    g(y') = grad_theta (1/N) sum_i sum_k y'_ik log softmax(s(x_i))_k over the surrogate's parameters; it is linear in
    y', so its gradient in y' (double backward) is exact. t: 'all-ones' (-1 everywhere, the paper's main setting) or
    'min-ip' (t = g(y), steering away from the true gradient). The minimiser moves m = min(1 - y_c0, eps/2) of mass
    onto c0, the class of lowest gradient, taken greedily from the classes of highest gradient.
    """

    def __init__(self, surrogate, epsilon, variant="original", target="all-ones"):
        self.surrogate, self.epsilon, self.variant, self.target = surrogate, float(epsilon), variant, target

    def direction(self, x, y):
        """d <g(y'), t> / d y' at y' = y (N x K)."""
        from toolkit.models.fast import forward

        params = [v.value for v in self.surrogate.trainable_variables]
        with torch.enable_grad():
            y_var = y.detach().clone().requires_grad_(True)
            log_p = torch.log_softmax(forward(self.surrogate, x, False).float(), dim=1)
            g = torch.autograd.grad((y_var * log_p).sum() / len(y), params, create_graph=True)
            if self.target == "all-ones":
                inner = -sum(gi.sum() for gi in g)
            else:
                inner = sum((gi * gi.detach()).sum() for gi in g)
            return torch.autograd.grad(inner, y_var)[0].detach()

    @staticmethod
    def step(y, grad, mass):
        """Moves ``mass`` (per row) onto the lowest-gradient class, from the highest-gradient classes first."""
        n, k = y.shape
        c0 = grad.argmin(1)
        mass = torch.minimum(mass, 1 - y.gather(1, c0[:, None])[:, 0]).clamp_min(0)
        order = grad.scatter(1, c0[:, None], float("-inf")).argsort(1, descending=True)
        available = y.gather(1, order)
        available[:, -1] = 0  # the last in order is c0 itself
        before = available.cumsum(1) - available
        take_sorted = (mass[:, None] - before).clamp_min(0).minimum(available)
        take = torch.zeros_like(y).scatter(1, order, take_sorted)
        out = y - take
        out[torch.arange(n), c0] += take.sum(1)
        return out

    def __call__(self, x, y):
        grad = self.direction(x, y)
        mass = torch.full((len(y),), self.epsilon / 2, dtype=y.dtype, device=y.device)
        if self.variant != "argmax":
            return self.step(y, grad, mass)
        lo, hi = torch.zeros_like(mass), mass.clone()
        top = y.argmax(1)
        keeps = self.step(y, grad, hi).argmax(1) == top
        lo = torch.where(keeps, hi, lo)
        for _ in range(30):  # the top-1 survives on an interval [0, m*]: bisect for m*
            mid = (lo + hi) / 2
            ok = self.step(y, grad, mid).argmax(1) == top
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        return self.step(y, grad, lo)


class PerturbedDeployable(Deployable):
    """The target's probabilities, perturbed per query batch by ``perturb(x, y) -> y'``."""

    def __init__(self, model, perturb, card, folder=None):
        super().__init__(card, folder)
        self.model, self.perturb = model, perturb

    def _proba(self, x):
        from toolkit.models.fast import forward

        y = torch.softmax(forward(self.model, x, False).float(), dim=1)
        return self.perturb(x, y)


def build_perturbation(config, surrogate=None):
    """The perturbation of a card's ``deployable`` entry (method, epsilon, variant and the method's options)."""
    method, eps, variant = config["method"], config["epsilon"], config["variant"]
    if method == "randp":
        return RandomPerturbation(eps, variant, config.get("seed", 0))
    if method == "p-poison":
        return MAD(surrogate, eps, variant, config.get("oracle", "extreme"))
    return GradientRedirection(surrogate, eps, variant, config.get("direction", "all-ones"))


@register_deployable("perturbation")
def _load_perturbed(folder, card):
    folder = pathlib.Path(folder)
    entry = card["deployable"]
    surrogate = load_keras_model(folder / entry["surrogate"]) if entry.get("surrogate") else None
    return PerturbedDeployable(load_keras_model(folder / entry["file"]), build_perturbation(entry, surrogate), card,
                               folder)


METHODS = ("randp", "p-poison", "grad")


def build(folder, spec, target_folder, target_card, data, teacher, dry_run=False, force=False, data_root=None):
    """Deploys an output-perturbation defense: the target's weights plus, for p-poison and grad, a surrogate
    (random initialisation for p-poison; grad distils it from the target on the transfer set). -> (entry, extra)."""
    from toolkit.artifacts import copy_model_file

    filename = copy_model_file(target_folder, target_card, folder)
    cfg = spec["perturbation"]
    entry = {"type": "perturbation", "method": spec["method"], "file": filename, "epsilon": cfg["epsilon"],
             "variant": cfg["variant"], "seed": spec["seed"]}
    if spec["method"] == "p-poison":
        entry["oracle"] = cfg["oracle"]
    if spec["method"] == "grad":
        entry["direction"] = cfg["direction"]
    extra = {}
    if spec["method"] != "randp":
        surrogate, extra = _surrogate(folder, spec, target_card, data, teacher, dry_run, force, data_root)
        entry["surrogate"] = save_model(folder, surrogate, "surrogate.keras")
    return entry, extra


def _surrogate(folder, spec, target_card, data, teacher, dry_run, force, data_root):
    """p-poison: a randomly initialised surrogate (as released: lr 0); grad: distilled on the transfer set."""
    import keras

    from toolkit.data import BatchStream, load_dataset
    from toolkit.models import build_model
    from toolkit.models.fast import forward
    from toolkit.schemas import spec_hash
    from toolkit.training.evaluate import accuracy, model_predictor
    from toolkit.training.loop import fit
    from toolkit.training.optim import make_optimizer

    cfg = spec["surrogate"]
    arch = cfg["architecture"] or target_card["architecture"]["architecture"]
    options = cfg["options"] if cfg["architecture"] else (target_card["architecture"].get("options") or {})
    keras.utils.set_random_seed(spec["seed"] + 17)
    surrogate = build_model(arch, data.input_shape, data.num_classes, data.mean, data.std, name="surrogate", **options)
    epochs = 0 if spec["method"] == "p-poison" else (1 if dry_run else cfg["epochs"])
    info = {"surrogate": {"architecture": arch, "options": options, "epochs": epochs}}
    if epochs == 0:
        return surrogate, info
    transfer = load_dataset(cfg["transfer"], data_root).train if cfg["transfer"] else data.train
    stream = BatchStream(transfer, cfg["batch_size"], shuffle=True, seed=spec["seed"] + 29)
    steps = 2 if dry_run else len(stream)
    optimizer = make_optimizer(cfg["optimizer"], cfg["schedule"], steps, epochs)

    def distill(x, y):  # soft cross-entropy to the target's posteriors: the surrogate never sees true labels
        with torch.no_grad():
            p_target = torch.softmax(forward(teacher, x, False), dim=1)
        return -(p_target * torch.log_softmax(forward(surrogate, x, True), dim=1)).sum(1).mean()

    predict = model_predictor(surrogate)
    fingerprint = spec_hash({"surrogate": cfg, "seed": spec["seed"], "data": data.fingerprint(), "dry_run": dry_run})
    fit(pathlib.Path(folder), "surrogate", surrogate, stream, distill, lambda: {"val_acc": accuracy(predict, data.val)},
        fingerprint, epochs, optimizer, steps=steps, discard_stale=force)
    info["surrogate"]["val_acc"] = accuracy(predict, data.val)
    return surrogate, info
