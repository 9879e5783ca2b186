"""The other Keras backends (TensorFlow, NumPy): measurements only, as host NumPy arrays.

The same function names and signatures as ``_torch`` and ``_jax``. Forward passes call the model in
inference mode and bring the outputs to the host; the gradient and the Hessian-vector product are not
implemented here and raise :class:`NotImplementedError` naming the supported backends (``fit`` cannot run
CREST on these backends either, see the package's docstring).
"""

from __future__ import annotations

import numpy as np
from keras import ops as kops

from . import _assigned_anchor, _require_supported, _take, _variable_values


def pinned(ops):
    """No weights to hold: the variables are the weights."""
    return None


def params(ops):
    return np.concatenate([np.array(kops.convert_to_numpy(v.value)).reshape(-1) for v in ops._tvars()])


def outputs(ops, idx: np.ndarray, embeddings: bool):
    net = ops._embedding_model() if embeddings else ops.model

    def call(sel):
        res = net(_take(ops.x, sel), training=False)
        return res if embeddings else (None, res)

    return ops._host_outputs(idx, embeddings, call)


def gradient(ops, idx: np.ndarray, w: np.ndarray):
    _require_supported("gradients of the weighted coreset loss", ops.backend)


def hutchinson(ops, idx: np.ndarray, w: np.ndarray, z: np.ndarray):
    _require_supported("Hessian-vector products (the Hutchinson probe)", ops.backend)


def preflight(ops, idx: np.ndarray, embeddings: bool):
    """Nothing to check before the first step: a refusal at the first selection leaves the weights in the
    variables (only Keras's JAX trainer detaches them within an epoch). Returns None (width not read)."""
    return None


def live_non_trainable(ops):
    """The current non-trainable values (the variables are the weights), not the anchor's."""
    return _variable_values(ops)


def measuring(ops):
    """The anchor's moving statistics in the variables for a measurement (``_assigned_anchor``)."""
    return _assigned_anchor(ops)
