"""Defenses: each yields a deployable (``predict_proba``) saved in an artifact folder.

- ``misleader``: heterogeneous distilled members trained against simulated clones, soft-voted (``defend``).
- ``undefended``: the target as is.
"""

from toolkit.defenses import ensemble  # noqa: F401  (registers the 'ensemble' deployable)
from toolkit.defenses.defend import defend

__all__ = ["defend"]
