"""The jax backend of :mod:`crestcore.adapters.keras`: the model operations of :class:`KerasModelOps`.

The same function names and signatures as ``_torch`` and ``_generic``. Forward passes use
``model.stateless_call(..., training=False)``; the gradient and the Hessian-vector product are
``jax.value_and_grad`` and ``jax.jvp`` of ``jax.grad``, jitted once per :class:`KerasModelOps` and padded to
a handful of chunk lengths so that a run compiles each for a few shapes only. During ``fit`` the weights
are read from the trainer's current state (Keras detaches them from the variables within an epoch), never
written. Results are host NumPy copies: nothing the jitted train step donates is kept.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from .. import _common
from . import _anchor_items, _check_finite_np, _check_reached, _crossentropy, _jax_contract_error, _take


def _weights(ops):
    """The weights a measurement uses: :func:`_live`'s, with the anchor's floating non-trainable values
    (BatchNorm's moving statistics, kept by ``KerasModelOps.new_anchor``) in place of the current ones."""
    tv, ntv = _live(ops)
    if ops._anchor:
        ntv = list(ntv)  # _live may hand back the pinned lists themselves: never written
        for i, a in _anchor_items(ops):
            if i < len(ntv) and tuple(ntv[i].shape) == a.shape:
                ntv[i] = jnp.asarray(a, dtype=ntv[i].dtype)
    return tv, ntv


def live_non_trainable(ops):
    """The current non-trainable values (the trainer's state during fit), not the anchor's."""
    return _live(ops)[1]


def measuring(ops):
    """Nothing to set: :func:`_weights` hands the anchor's statistics to the stateless calls."""
    return contextlib.nullcontext()


def _live(ops):
    """(trainable, non-trainable) value lists: pinned at the last ``on_train_batch_begin``, else the
    trainer's current state during fit, else the variables. Read, never written."""
    if ops._pinned is not None:
        return ops._pinned
    m = ops.model
    # Keras's private JAX-trainer state (keras/src/backend/jax/trainer.py): ``_jax_state_synced`` (set by
    # JAXTrainer.__init__, False while fit holds the weights detached from the variables) and ``_jax_state``
    # (a dict with the trainer's current "trainable_variables" and "non_trainable_variables"). Should a
    # Keras release rename or reshape them, fail loudly here instead of reading variables that may hold the
    # weights of the start of the epoch.
    if not hasattr(m, "_jax_state_synced"):
        raise RuntimeError(_jax_contract_error(m, "the model has no attribute '_jax_state_synced'"))
    st = getattr(m, "_jax_state", None)
    tv = ntv = None
    if not m._jax_state_synced:
        if st is not None and not (isinstance(st, dict) and "trainable_variables" in st
                                   and "non_trainable_variables" in st):
            raise RuntimeError(_jax_contract_error(
                m, f"'_jax_state' is a {type(st).__name__} with keys "
                   f"{sorted(st) if isinstance(st, dict) else '?'}, expected a dict with 'trainable_variables' "
                   "and 'non_trainable_variables'"))
        if st is not None:
            tv, ntv = st.get("trainable_variables"), st.get("non_trainable_variables")
    if tv is None:
        tv = [v.value for v in ops._tvars()]
    if ntv is None:
        ntv = [v.value for v in m.non_trainable_variables]
    if any(t is None for t in tv) or any(t is None for t in ntv):
        raise RuntimeError(
            "crestcore.adapters.keras: Keras's JAX trainer holds the weights detached from the model's "
            "variables here (within an epoch), and its current state was not reachable. KerasModelOps is "
            "meant to run from CrestCallback's hooks; elsewhere call model.jax_state_sync() first."
        )
    return list(tv), list(ntv)


def pinned(ops):
    """The weights of the upcoming step (a reference, no copy)."""
    return _live(ops)


def _values_of(ops, net, tv, ntv):
    """The model's (trainable, non-trainable) values ``tv``, ``ntv`` that ``net`` (a model sharing its layers,
    the embedding model) reads, in ``net``'s variable order."""
    pos = {id(v): i for i, v in enumerate(ops._tvars())}
    npos = {id(v): i for i, v in enumerate(ops.model.non_trainable_variables)}
    return ([tv[pos[id(v)]] for v in net.trainable_variables],
            [ntv[npos[id(v)]] for v in net.non_trainable_variables])


def preflight(ops, idx: np.ndarray, embeddings: bool):
    """The first selection's refusals, raised before Keras's JAX trainer detaches the model's variables
    (where raising left the model without weights, review 66): ``embeddings=True`` on a model without a
    Dense classifier, no trainable variable reached by the loss; returns the output width (labels beyond it
    are the caller's to refuse). By abstract evaluation (``jax.eval_shape``, the jaxpr of the loss): nothing
    is computed or compiled, and the reach traced here is the one the first measurement reuses."""
    tv, ntv = _weights(ops)
    sel = _padded(ops, idx)
    xb = _take(ops.x, sel)
    net = ops._embedding_model() if embeddings else ops.model  # (its refusals first)
    ttv, tntv = _values_of(ops, net, tv, ntv) if embeddings else (tv, ntv)

    def call(a, b, x):
        out, _ = net.stateless_call(a, b, x, **_eval_kwargs(net))
        return out[1] if embeddings else out

    spec = jax.eval_shape(call, ttv, tntv, xb)
    if not hasattr(spec, "shape"):  # a dict or list of outputs: the refusal that says how to build the model
        ops._check_out(spec, int(sel.size))
    width = int(spec.shape[-1]) if len(spec.shape) == 2 else None
    if width is not None and width >= 2:  # (a one-column model is refused by the callback with its reason)
        _, xc, yc, wc, N = next(_chunks(ops, idx, np.ones(idx.size)))
        _check_reach(ops, tv, ntv, xc, np.minimum(yc, width - 1), wc, N)
    return width


def params(ops):
    tv, _ = _live(ops)
    return _flat(tv)


def _eval_kwargs(model) -> dict:
    """``training=False`` for a model whose ``call`` takes it (as Keras's own JAX trainer passes it): a
    subclassed model with ``call(self, x)`` only gets nothing."""
    return {"training": False} if getattr(model, "_call_has_training_arg", True) else {}


def _compiled(ops) -> dict:
    """The jitted measurements, made again when the model's variable lists changed (review 84): a trace
    binds the values it is handed to the variables that were trainable when it was traced, and jax reuses
    it for lists of the same shapes, so after a swap of which same-shape layer trains each value went into
    the other layer, silently."""
    model, probs = ops.model, ops.from_probabilities
    key = (tuple(id(v) for v in model.trainable_variables), tuple(id(v) for v in model.non_trainable_variables))
    if ops._compiled is not None and ops._compiled["key"] == key:
        return ops._compiled

    def forward(tv, ntv, xb):
        out, _ = model.stateless_call(tv, ntv, xb, **_eval_kwargs(model))
        return out

    def wloss(tv, ntv, xb, yb, wb, N):
        ell = _crossentropy(forward(tv, ntv, xb), yb, probs)
        return jnp.sum(wb * ell) / N, ell

    def value_grad(tv, ntv, xb, yb, wb, N):
        (val, ell), g = jax.value_and_grad(wloss, has_aux=True)(tv, ntv, xb, yb, wb, N)
        return val, ell, g

    def hvp(tv, ntv, xb, yb, wb, N, zs):
        def grad_of(t):
            return jax.grad(lambda s: wloss(s, ntv, xb, yb, wb, N)[0])(t)

        return jax.jvp(grad_of, (tv,), (zs,))[1]

    ops._compiled = {"forward": jax.jit(forward), "value_grad": jax.jit(value_grad), "hvp": jax.jit(hvp),
                     "wloss": wloss, "key": key}
    return ops._compiled


def _reaches(fn, tv, *args) -> bool:
    """Whether ``fn(tv, *args)``'s first output depends on any leaf of ``tv``: a walk back from that output
    through the equations of its jaxpr (an equation's outputs taken as depending on all its inputs, so a
    weight inside a nested call counts as reached: never a false refusal). JAX's gradient of a weight the
    output does not read is an exact 0, which the torch backend's autograd reports as unused instead."""
    closed = jax.make_jaxpr(fn)(tv, *args)
    jaxpr = closed.jaxpr
    needed = {id(v) for v in jaxpr.outvars[:1] if not hasattr(v, "val")}
    for eqn in reversed(jaxpr.eqns):
        if any(id(o) in needed for o in eqn.outvars):
            needed.update(id(v) for v in eqn.invars if not hasattr(v, "val"))  # (a Literal has .val)
    n_tv = len(jax.tree_util.tree_leaves(tv))
    return any(id(v) in needed for v in jaxpr.invars[:n_tv])


def _check_reach(ops, tv, ntv, xb, yb, wb, N) -> None:
    """:func:`_check_reached` for the jitted loss, traced once per set of variables (the compiled functions'
    key: the model's structure does not change between measurements of one set)."""
    compiled = _compiled(ops)
    if "reached" not in compiled:
        compiled["reached"] = _reaches(compiled["wloss"], tv, ntv, xb, yb, wb, N)
    _check_reached(compiled["reached"])


def _padded(ops, sel: np.ndarray) -> np.ndarray:
    """``sel`` padded (repeating its first index) to a power of two, at least 8 and at most ``batch_size``,
    so a run compiles each jitted function for a handful of shapes, not once per subset-union size."""
    k = sel.size
    target = k if k >= ops.batch_size else min(ops.batch_size, max(8, 1 << (k - 1).bit_length()))
    return sel if target <= k else np.concatenate([sel, np.repeat(sel[:1], target - k)])


def outputs(ops, idx: np.ndarray, embeddings: bool):
    tv, ntv = _weights(ops)
    if embeddings:
        emb = ops._embedding_model()
        etv, entv = _values_of(ops, emb, tv, ntv)

        def call(sel):
            (e, out), _ = emb.stateless_call(etv, entv, _take(ops.x, _padded(ops, sel)), **_eval_kwargs(emb))
            return e, out
    else:
        forward = _compiled(ops)["forward"]

        def call(sel):
            return None, forward(tv, ntv, _take(ops.x, _padded(ops, sel)))

    return ops._host_outputs(idx, embeddings, call)


def _chunks(ops, idx, w):
    """(chunk length, padded inputs, labels, weights, N) per measurement chunk; padding rows weigh 0 (they
    repeat a real, finite example)."""
    for a, b in _common.chunk_spans(idx.size, ops.batch_size):
        sel = _padded(ops, idx[a:b])
        wb = np.zeros(sel.size, dtype=np.float32)
        wb[: b - a] = w[a:b]
        yield b - a, _take(ops.x, sel), ops.labels[sel].astype(np.int32), wb, np.float32(idx.size)


def _flat(parts) -> np.ndarray:
    """One host vector (a copy) of jax arrays; bfloat16 (ml_dtypes, not a NumPy floating dtype the core
    accepts) in float32, where the gradients' sums over chunks are then accumulated too."""
    flat = np.concatenate([np.asarray(t).reshape(-1) for t in parts])
    return flat if flat.dtype.kind == "f" else flat.astype(np.float32)


def gradient(ops, idx: np.ndarray, w: np.ndarray):
    value_grad = _compiled(ops)["value_grad"]
    tv, ntv = _weights(ops)
    acc = None
    total = 0.0
    for k, xb, yb, wb, N in _chunks(ops, idx, w):
        _check_reach(ops, tv, ntv, xb, yb, wb, N)
        val, ell, g = value_grad(tv, ntv, xb, yb, wb, N)
        ell = np.asarray(ell)[:k]
        if not np.all(np.isfinite(ell)):
            raise _common.measurement_error("losses", int((~np.isfinite(ell)).sum()), k)
        flat = _flat(g)
        acc = flat if acc is None else acc + flat
        total += float(val)
    _check_finite_np(acc, "gradients")
    return total, acc


def hutchinson(ops, idx: np.ndarray, w: np.ndarray, z: np.ndarray):
    hvp = _compiled(ops)["hvp"]
    tv, ntv = _weights(ops)
    sizes = [int(np.prod(t.shape)) for t in tv]
    zs = [c.reshape(t.shape).astype(np.asarray(t).dtype) for c, t in zip(np.split(z, np.cumsum(sizes)[:-1]), tv)]
    acc = None
    for _, xb, yb, wb, N in _chunks(ops, idx, w):
        _check_reach(ops, tv, ntv, xb, yb, wb, N)
        flat = _flat(hvp(tv, ntv, xb, yb, wb, N, zs))
        acc = flat if acc is None else acc + flat
    out = z * acc
    _check_finite_np(out, "Hessian-vector products")
    return out
