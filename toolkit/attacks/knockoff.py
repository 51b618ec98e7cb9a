"""Knockoff Nets (Orekondy et al., CVPR 2019): query natural images from a surrogate set, train a clone on the answers.

Policies: 'random' (uniform without replacement, the public code) and 'adaptive' (the paper's gradient bandit over
surrogate classes, rewarded by the answers' certainty, diversity and the clone's loss). Protocols: 'reference' (the
public code's: spend the whole budget, then one training run of ``epochs`` epochs on the whole transfer set, the
schedule stepped per epoch; the curve is clone accuracy vs epoch) and 'rounds' (the budget in ``rounds`` parts, the
clone training on everything collected so far after each: an accuracy-vs-queries curve, and what the adaptive policy
needs, as its loss reward reads the clone). An optional check slice of the attacker's own answers (every
1/``check_fraction``-th answer, fixed when it is collected) is never trained on. Faithfulness: results/faithfulness.md.
"""

import numpy as np

from toolkit import progress
from toolkit.data.batches import to_float_tensor
from toolkit.models.fast import forward
from toolkit.oracle import BudgetExhausted
from toolkit.training.optim import apply_gradients, make_optimizer, zero_grad


def soft_cross_entropy(logits, targets):
    import torch.nn.functional as F

    if targets.ndim == 1:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


class KnockoffAttack:
    """Collects a transfer set through ``oracle`` from ``pool`` (a Split) and trains ``clone`` on it."""

    def __init__(self, oracle, clone, pool, config, seed=0, evaluate=None):
        self.oracle, self.clone, self.pool = oracle, clone, pool
        self.cfg = config  # the threat spec's "knockoff" block, defaults filled
        self.rng = np.random.default_rng(seed)
        self.evaluate = evaluate  # reporting only (defender's test set); never used for a decision
        self.queried, self.answers = [], []
        self.curve = []

    def _next_indices(self, n, used):
        if self.cfg["policy"] == "adaptive":
            return self._bandit_indices(n, used)
        free = np.setdiff1d(np.arange(len(self.pool)), np.fromiter(used, int, len(used)), assume_unique=False)
        if len(free) < n:
            raise BudgetExhausted(f"surrogate pool exhausted ({len(self.pool)} images)")
        return self.rng.choice(free, size=n, replace=False)

    def _snapshot(self, round_index, epochs_done):
        meta = {"round": round_index, "epochs_done": epochs_done, "curve": self.curve,
                "rng": self.rng.bit_generator.state}
        if self.cfg["policy"] == "adaptive":
            meta["bandit"] = {"preferences": self.preferences.tolist(), "mean_reward": float(self.mean_reward),
                              "steps": int(self.steps), "by_class": {str(c): [int(i) for i in v]
                                                                for c, v in self.by_class.items()},
                              "recent": None if self.recent is None else np.asarray(self.recent, float).tolist()}
        arrays = {}
        if self.queried:
            arrays = {"queried": np.concatenate(self.queried), "answers": np.concatenate(
                [a.numpy() for a in self.answers])}
        return meta, arrays

    def _resume(self, meta, arrays):
        import torch

        self.curve = meta["curve"]
        self.rng.bit_generator.state = meta["rng"]
        if "queried" in arrays:
            self.queried, self.answers = [arrays["queried"]], [torch.from_numpy(arrays["answers"])]
        if self.cfg["policy"] == "adaptive":
            b = meta["bandit"]
            self.preferences, self.mean_reward, self.steps = np.array(b["preferences"]), b["mean_reward"], b["steps"]
            self.by_class = {c: list(b["by_class"][str(c)]) for c in self.classes}
            self.recent = None if b["recent"] is None else torch.tensor(b["recent"])
        return meta["round"], meta["epochs_done"]  # where to go on: this round's collection is complete

    def protocol(self):
        return self.cfg["protocol"] or ("rounds" if self.cfg["policy"] == "adaptive" else "reference")

    def _collect(self, target, used, bar, save=None, every=None):
        """Queries until ``target`` answers are held (the budget and the pool permitting); ``save()`` every ``every``
        queries keeps the answers of a long collection if the run is killed."""
        cfg, oracle = self.cfg, self.oracle
        last_save = oracle.queries_used
        while len(used) < target:
            # a restart after a kill may have lost paid-for answers: the last round then fits what is left
            n = min(cfg["query_batch"], target - len(used), oracle.remaining)
            if n <= 0:
                break
            idx = self._next_indices(n, used)
            answers = oracle.query(to_float_tensor(self.pool.x[idx]))
            if cfg["policy"] == "adaptive":
                self._bandit_update(idx, answers)
            used.update(idx.tolist())
            self.queried.append(idx)
            self.answers.append(answers.cpu())
            bar.update(n)
            if save is not None and every and oracle.queries_used - last_save >= every:
                save()
                last_save = oracle.queries_used

    def _transfer_set(self):
        """(train indices, train answers, check indices, check answers) of everything collected so far."""
        import torch

        x_idx, y = np.concatenate(self.queried), torch.cat(self.answers)
        position = np.arange(len(x_idx))
        f = self.cfg["check_fraction"]
        check = np.floor((position + 1) * f) > np.floor(position * f)  # fixed per answer: never trained on, ever
        return x_idx[~check], y[torch.from_numpy(~check)], x_idx[check], y[torch.from_numpy(check)]

    def run(self, state=None, checkpoint_every=None):
        """Spends the budget and trains the clone by the configured protocol; resumes from ``state`` (saved after
        every ``checkpoint_every`` queries, each epoch and each round)."""
        cfg, oracle = self.cfg, self.oracle
        total = min(oracle.budget, len(self.pool))
        reference = self.protocol() == "reference"
        rounds = 1 if reference else cfg["rounds"]
        per_round = int(np.ceil(total / rounds))
        epochs_per_round = cfg["epochs"] if reference else max(1, cfg["epochs"] // rounds)
        opt = make_optimizer(cfg["optimizer"], cfg["schedule"], 1, cfg["epochs"])
        variables = self.clone.trainable_variables
        opt.build(variables)
        models, optimizers = {"clone": self.clone}, {"clone": opt}
        if cfg["policy"] == "adaptive":
            self._bandit_setup()
        first_round, first_epoch = 0, 0
        if state is not None and (saved := state.restore(oracle, models, optimizers)) is not None:
            first_round, first_epoch = self._resume(*saved)
        used = set(np.concatenate(self.queried).tolist()) if self.queried else set()
        bar = progress.bar(total, "knockoff queries", unit="q", initial=len(used))
        n_points = min(cfg["epochs"], cfg["curve_points"])
        points = set(np.linspace(0, cfg["epochs"], n_points + 1)[1:].round().astype(int))
        for r in range(first_round, rounds):
            save = None if state is None else (
                lambda r=r: state.save(oracle, models, optimizers, *self._snapshot(r, 0)))
            self._collect(min(total, (r + 1) * per_round), used, bar, save, checkpoint_every)
            if r + 1 == rounds:
                bar.close()  # the budget is spent: what follows is training (one bar per round of epochs)
            if save is not None and first_epoch == 0:
                save()
            x_train, y_train, x_check, y_check = self._transfer_set()
            epoch_bar = progress.bar(epochs_per_round, f"knockoff training, round {r + 1}/{rounds}", unit="epoch",
                                     initial=first_epoch)
            for e in range(first_epoch, epochs_per_round):
                epoch = r * epochs_per_round + e  # global epoch: the schedule follows it, whatever the set's size
                opt.mtk_schedule.set_epoch(epoch)
                self._train_epoch(opt, variables, x_train, y_train)
                last = e + 1 == epochs_per_round
                if (reference and epoch + 1 in points) or last:
                    self._point(r, epoch + 1, x_check, y_check, len(x_train))
                if state is not None:
                    state.save(oracle, models, optimizers, *self._snapshot(r, e + 1))
                epoch_bar.update(1)
            epoch_bar.close()
            first_epoch = 0
        bar.close()
        return {"queries_used": oracle.queries_used, "curve": self.curve}

    def _point(self, r, epoch, x_check, y_check, n_train):
        check = self._agreement(x_check, y_check) if len(x_check) else None
        point = {"queries": self.oracle.queries_used, "epoch": epoch, "transfer_set": n_train,
                 "attacker_check_agreement": check}
        if self.evaluate is not None:
            point.update(self.evaluate(self.clone))
        self.curve.append(point)
        progress.log(f"[knockoff] round {r + 1}, epoch {epoch}/{self.cfg['epochs']}: {self.oracle.queries_used}/"
                     f"{self.oracle.budget} queries, {n_train} answers trained on"
                     + ("" if check is None else f", attacker check agreement {check:.4f}")
                     + "".join(f", {k} {v:.4f}" for k, v in point.items() if k.startswith("clone_")))

    def _train_epoch(self, opt, variables, x_idx, y):
        import torch

        order = self.rng.permutation(len(x_idx))
        bs = self.cfg["batch_size"]
        for i in range(0, len(order), bs):
            sel = order[i:i + bs]
            x = to_float_tensor(self.pool.x[x_idx[sel]])
            loss = soft_cross_entropy(forward(self.clone, x, True), y[torch.as_tensor(sel)])
            zero_grad(variables)
            loss.backward()
            apply_gradients(opt, variables)

    def _agreement(self, x_idx, y):
        import torch

        with torch.no_grad():
            pred = forward(self.clone, to_float_tensor(self.pool.x[x_idx]), False).argmax(1)
        labels = y if y.ndim == 1 else y.argmax(1)
        return float((pred.cpu() == labels).float().mean())

    # --- adaptive policy: gradient bandit over surrogate classes (Knockoff Nets, Sec. 4.1.2) ---
    def _bandit_setup(self):
        self.classes = np.unique(self.pool.y)
        self.by_class = {c: list(self.rng.permutation(np.flatnonzero(self.pool.y == c))) for c in self.classes}
        self.preferences = np.zeros(len(self.classes))
        self.mean_reward, self.steps = 0.0, 0
        self.recent = None

    def _policy(self):
        z = np.exp(self.preferences - self.preferences.max())
        return z / z.sum()

    def _bandit_indices(self, n, used):
        pi = self._policy()
        out, actions = [], []
        for _ in range(n):
            open_classes = [k for k, c in enumerate(self.classes) if self.by_class[c]]
            if not open_classes:
                raise BudgetExhausted("surrogate pool exhausted")
            p = pi[open_classes] / pi[open_classes].sum()
            k = open_classes[self.rng.choice(len(open_classes), p=p)]
            out.append(self.by_class[self.classes[k]].pop())
            actions.append(k)
        self._last_actions = np.array(actions)
        return np.array(out)

    def _bandit_update(self, idx, answers):
        import torch

        y = answers.float() if answers.ndim == 2 else torch.nn.functional.one_hot(answers, self.oracle.num_classes).float()
        top2 = y.topk(2, dim=1).values
        certainty = (top2[:, 0] - top2[:, 1]).numpy()
        mean = y.mean(0, keepdim=True) if self.recent is None else self.recent
        diversity = (y - mean).clamp_min(0).sum(1).numpy()
        self.recent = 0.9 * mean + 0.1 * y.mean(0, keepdim=True)
        with torch.no_grad():
            logits = forward(self.clone, to_float_tensor(self.pool.x[idx]), False).cpu()
        loss = (-(y * torch.log_softmax(logits, 1)).sum(1)).numpy()
        parts = {"cert": certainty, "div": diversity, "loss": loss}
        reward = sum(parts.values()) / 3 if self.cfg["reward"] == "all" else parts[self.cfg["reward"]]
        pi = self._policy()
        for k, r in zip(self._last_actions, reward):
            self.steps += 1
            self.mean_reward += (r - self.mean_reward) / self.steps
            onehot = np.zeros_like(pi)
            onehot[k] = 1.0
            self.preferences += self.cfg["bandit_lr"] * (r - self.mean_reward) * (onehot - pi)
