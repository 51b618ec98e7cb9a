"""Training: the epoch-loop helper, optimizers, checkpoints, evaluation, and the target trainer."""
