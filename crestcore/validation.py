"""Public boundary checks for code that feeds CREST's batches to a framework (the adapters, and yours).

Each check returns a normalised host (NumPy) copy or raises an error naming the argument:

* :func:`host_indices` -- example indices: 1-D integers in ``[0, n)``, as int64.
* :func:`host_weights` -- per-example weights: ``k`` finite numbers, as float64.
* :func:`stored_batch` -- a batch read back from a checkpoint (indices, weights, reselected).
* :func:`int64_labels` -- host integer labels as int64 (unsigned ones past int64's range refused, not
  wrapped to negative values).
* :func:`check_int` -- an integer argument in a range (bools refused), named in the error.
* :func:`check_choice` -- an argument that must be one of a few names, named in the error.
* :func:`check_epsilon` -- the stochastic greedy's ``epsilon``, a number in (0, 1).
* :func:`check_count` -- a positive (or non-negative, or optional) integer argument, a ``ValueError``
  naming it otherwise.
* :func:`not_floating` -- the ``TypeError`` for an array whose dtype is not real floating (a NumPy
  bfloat16 array from ml_dtypes is told what to do).
* :func:`all_finite` -- whether every entry of an array is finite, by one sum (the entrywise test only
  when the sum is not finite).
* :class:`DivergenceError` -- what CREST raises on non-finite numbers (a ``FloatingPointError``).
* :func:`masked_outputs_error` -- the ``ValueError`` for outputs whose only non-finite entries are ``-inf``
  (a mask of classes, not a divergence).
"""

from __future__ import annotations

from ._validation import (DivergenceError, all_finite, check_choice, check_count, check_epsilon, check_int, host_indices,
                          host_weights, int64_labels, masked_outputs_error, not_floating, stored_batch, user_stacklevel)

__all__ = ["DivergenceError", "all_finite", "check_choice", "check_count", "check_epsilon", "check_int", "host_indices",
           "host_weights", "int64_labels", "masked_outputs_error", "not_floating", "stored_batch", "user_stacklevel"]
