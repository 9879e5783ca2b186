"""Baselines CREST is compared with, on raw arrays (array API; NumPy, torch, CuPy, array-api-strict).

* :func:`random_subset` -- a uniform random subset, redrawn each epoch.
* :func:`craig` -- CRAIG (Mirzasoleiman et al. 2020): per-class facility location on gradients.
* :func:`gradmatch` -- GradMatch (Killamsetty et al. 2021): regularised non-negative OMP gradient
  matching, per class or per batch; :func:`nonneg_ridge` is its refit.
* :func:`glister` -- GLISTER (Killamsetty et al. 2021): greedy validation likelihood under a one-step
  Taylor model of the last layer, exact or stochastic greedy.
* :func:`prune_schedule` -- loss-based dynamic pruning in the style of InfoBatch (Qin et al. 2024).
* :func:`reselect_due` -- "every R epochs" for the methods that reselect periodically.
* :class:`SubsetSchedule` -- a baseline as a sequence of weighted mini-batches of dataset indices (when to
  select, what to measure, each epoch's layout): the framework adapters' loaders drive it.

Every function returns a :class:`crestcore.Selection` (indices int64, int32 on JAX without x64; weights, gains, objective) in
the namespace, on the device and in the floating dtype of its input, takes randomness only from its
``rng`` argument, validates its inputs with errors naming the argument, and never modifies them.

Weights follow one convention across the baselines ("sum semantics"): ``sum_{j in S} w_j l_j``
estimates or approximates the full-data sum ``sum_i l_i``. Divide by the mean weight for a mean-1
scaling.
"""

from ._common import reselect_due
from ._craig import craig
from ._glister import glister
from ._gradmatch import gradmatch, nonneg_ridge
from ._pruning import prune_schedule
from ._random import random_subset
from ._schedule import METHODS, SELECTING_METHODS, SOLVE_ON, SubsetSchedule, method_arguments

__all__ = ["random_subset", "craig", "gradmatch", "nonneg_ridge", "glister", "prune_schedule", "reselect_due",
           "SubsetSchedule", "METHODS", "SELECTING_METHODS", "SOLVE_ON", "method_arguments"]
