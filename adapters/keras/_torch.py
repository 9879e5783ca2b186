"""The torch backend of :mod:`crestcore.adapters.keras`: the model operations of :class:`KerasModelOps`.

Keras 3's own layout: one module per backend (``_torch``, ``_jax``, ``_generic``), the same function names
and signatures in each (``tests/adapters/test_keras.py`` checks it), chosen once by
``keras.backend.backend()``. Every function takes the :class:`KerasModelOps` first; nothing here keeps state
of its own. On torch the weights are the variables' tensors: read in place, never written; gradients and
Hessian-vector products use ``torch.autograd.grad`` (the PyTorch adapter's accumulation), results are torch
tensors on Keras's device.
"""

from __future__ import annotations

import numpy as np
import torch
from keras import ops as kops
from keras import tree

from .. import _common
from ..torch import add_grad, add_hvp  # the same accumulation as the PyTorch adapter
from . import _assigned_anchor, _check_reached, _crossentropy, _log_probabilities, _take, _variable_values


def pinned(ops):
    """The weights to hold for the upcoming step: none on torch (the variables are the weights)."""
    return None


def preflight(ops, idx: np.ndarray, embeddings: bool):
    """Nothing to check before the first step: on torch the weights stay in the variables, so a refusal at
    the first selection leaves them in place. Returns None (width not read)."""
    return None


def params(ops):
    """A copy of the flat trainable weights, a torch tensor."""
    return torch.cat([v.value.detach().reshape(-1) for v in ops._tvars()]).clone()


def _inputs(ops, sel: np.ndarray):
    return tree.map_structure(kops.convert_to_tensor, _take(ops.x, sel))


def outputs(ops, idx: np.ndarray, embeddings: bool):
    logits, embs = [], []
    net = ops._embedding_model() if embeddings else ops.model
    with torch.no_grad():
        for a, b in _common.chunk_spans(idx.size, ops.batch_size):
            out = net(_inputs(ops, idx[a:b]), training=False)
            if embeddings:
                e, out = out
                embs.append(e.float().reshape(b - a, -1))
            ops._check_out(out, b - a)
            out = out.float()
            logits.append(_log_probabilities(out) if ops.from_probabilities else out)
    if not logits:
        raise ValueError("outputs needs at least one index")
    z = torch.cat(logits)
    bad = ~torch.isfinite(z)
    if bool(bad.any()):
        raise _common.measurement_error("outputs", int(bad.any(dim=1).sum()), z.shape[0],
                                        neg_inf=not bool((torch.isnan(z) | (z == torch.inf)).any()))
    return (z, torch.cat(embs)) if embeddings else z


def _part(ops, idx, w, a, b, N):
    """The weighted loss of the chunk ``idx[a:b]``, divided by ``N``, with its graph."""
    out = ops.model(_inputs(ops, idx[a:b]), training=False)
    ops._check_out(out, b - a)
    ell = _crossentropy(out, kops.convert_to_tensor(ops.labels[idx[a:b]]), ops.from_probabilities)
    if not bool(torch.isfinite(ell.detach()).all()):
        raise _common.measurement_error("losses", int((~torch.isfinite(ell.detach())).sum()), b - a)
    return (torch.as_tensor(w[a:b], dtype=ell.dtype, device=ell.device) * ell).sum() / N


def gradient(ops, idx: np.ndarray, w: np.ndarray):
    params_ = [v.value for v in ops._tvars()]
    acc = [torch.zeros_like(p) for p in params_]
    total = 0.0
    used = False
    with torch.enable_grad():
        for a, b in _common.chunk_spans(idx.size, ops.batch_size):
            part = _part(ops, idx, w, a, b, idx.size)
            used = any(add_grad(part, params_, acc)) or used
            total += float(part.detach())
    _check_reached(used)
    flat = torch.cat([g.reshape(-1) for g in acc])
    if not bool(torch.isfinite(flat).all()):
        raise _common.measurement_error("gradients", 1, 1)
    return total, flat


def hutchinson(ops, idx: np.ndarray, w: np.ndarray, z: np.ndarray):
    params_ = [v.value for v in ops._tvars()]
    zt = torch.as_tensor(z, device=params_[0].device, dtype=params_[0].dtype)
    zs = [t.view_as(p) for t, p in zip(torch.split(zt, [p.numel() for p in params_]), params_)]
    acc = [torch.zeros_like(p) for p in params_]
    used = False
    with torch.enable_grad():
        for a, b in _common.chunk_spans(idx.size, ops.batch_size):
            used = any(add_hvp(_part(ops, idx, w, a, b, idx.size), params_, zs, acc)) or used
    _check_reached(used)
    out = zt * torch.cat([h.reshape(-1) for h in acc])
    if not bool(torch.isfinite(out).all()):
        raise _common.measurement_error("Hessian-vector products", 1, 1)
    return out


def live_non_trainable(ops):
    """The current non-trainable values (the variables are the weights), not the anchor's."""
    return _variable_values(ops)


def measuring(ops):
    """The anchor's moving statistics in the variables for a measurement (``_assigned_anchor``)."""
    return _assigned_anchor(ops)
