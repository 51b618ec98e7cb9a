"""Defenses: each yields a deployable (``predict_proba``) saved in an artifact folder; ``defend(spec)`` builds one.

- ``misleader``: heterogeneous distilled members trained against simulated clones, soft-voted (misleader.py,
  ensemble.py).
- ``undefended``: the target as is.
- output perturbation (perturbation.py): ``randp``, ``p-poison`` (MAD), ``grad`` (GRAD²).
- trained baselines: ``misinformation`` (misinformation.py), ``edm`` (edm.py), ``dnf`` (dnf.py); shared plumbing in
  trained.py.
- output postprocessors that compose with any of them (postprocess.py).
"""

from toolkit.defenses import ensemble  # noqa: F401  (registers the 'ensemble' deployable)
from toolkit.defenses.defend import defend

__all__ = ["defend"]
