"""MISLEADER's member objective (paper Eq. 5-6, as released) as pure torch functions, so tests can check them."""

import math


def kl_batchmean(p_log, q_log):
    """KL(p || q) per batch (mean over samples) from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(1).mean()


def distillation_loss(student_logits, teacher_logits, labels, temperature, alpha):
    """alpha * T^2 * KL(softmax(t/T) || softmax(d/T)) + (1 - alpha) * CE(d, y); returns (total, kd, ce)."""
    import torch.nn.functional as F

    T = float(temperature)
    teacher = F.softmax(teacher_logits / T, dim=1).clamp(min=1e-10)  # released clamp
    kd = (teacher * (teacher.log() - F.log_softmax(student_logits / T, dim=1))).sum(1).mean() * T * T
    ce = F.cross_entropy(student_logits, labels)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


def adversary_divergence(defender_logits, attacker_logits, kind="kl", clamp=5.0):
    """How far the defender's answers on x~ are from the (detached) simulated clone's.

    'kl': KL(d || a), the released unbounded term (defender probs clamped at 1e-7 as released);
    'kl_clamped': per-sample KL capped at ``clamp`` (no gradient from samples beyond the cap);
    'js': Jensen-Shannon divergence, bounded by log 2.
    """
    import torch.nn.functional as F

    a_log = F.log_softmax(attacker_logits.detach(), dim=1)
    d = F.softmax(defender_logits, dim=1).clamp(min=1e-7, max=1.0)
    if kind == "js":
        a = a_log.exp()
        m = 0.5 * (d + a)
        return 0.5 * ((d * (d.log() - m.log())).sum(1) + (a * (a_log - m.log())).sum(1)).mean()
    per_sample = (d * (d.log() - a_log)).sum(1)
    if kind == "kl_clamped":
        per_sample = per_sample.clamp(max=float(clamp))
    elif kind != "kl":
        raise ValueError(f"unknown adversary loss {kind}")
    return per_sample.mean()


def attacker_loss(defender_logits, attacker_logits):
    """The simulated clone's objective KL(d(x~) || a(x~)) with the defender's answers as fixed targets."""
    import torch.nn.functional as F

    return kl_batchmean(F.log_softmax(defender_logits.detach(), dim=1), F.log_softmax(attacker_logits, dim=1))


JS_BOUND = math.log(2.0)
