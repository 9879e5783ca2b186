"""Last-layer gradient features, the proxy CREST (and CRAIG) select on.

For cross-entropy ``l = -log softmax(z)_y`` the gradient with respect to the logits ``z`` is
``softmax(z) - onehot(y)`` (C numbers per example). For a last linear layer ``z = W e + b`` the
gradient with respect to ``W`` is the outer product ``(softmax(z) - onehot(y)) e^T``.
"""

from __future__ import annotations

import numpy as np

from ._compat import device_of, index_dtype, namespace
from ._validation import check_float_matrix, check_labels
from .similarity import accumulating

__all__ = ["last_layer_gradients", "softmax", "cross_entropy"]


def softmax(logits):
    """Row-wise softmax, numerically stable (the row maximum is subtracted first).

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([[0.0, 0.0], [1000.0, 1000.0 + np.log(3.0)]]))
    array([[0.5 , 0.5 ],
           [0.25, 0.75]])
    """
    xp = namespace(logits, names=("logits",))
    check_float_matrix(xp, logits, "logits")
    return _softmax(xp, logits)


def _flag(v) -> bool:
    """``from_probabilities`` as a bool: NumPy's bool taken (its refusal read "must be a bool, got bool")."""
    if isinstance(v, np.bool_):
        return bool(v)
    if not isinstance(v, bool):
        raise TypeError(f"from_probabilities must be a bool, got {type(v).__name__}")
    return v


def _shifted(xp, logits):
    """``(z, exp(z))`` for ``z`` the (n, C) logits less each row's maximum: what the softmax and the
    cross-entropy both start from (the controller computes them once for both: at 10^4 classes each is a pass
    over the whole array)."""
    z = logits - xp.max(logits, axis=-1, keepdims=True)  # shift first: no cancellation against max
    return z, xp.exp(z)


def _softmax(xp, logits, exps=None):
    """The softmax; ``exps``: the exponentials of :func:`_shifted`, computed already and not read again by the
    caller, which are then divided in place where they are summed in their own dtype (no array of their size
    more at the peak: at 10^4 classes and r = 2,048, 80 MB)."""
    e = _shifted(xp, logits)[1] if exps is None else exps
    w = accumulating(xp, e)
    if exps is not None and w is e:
        w /= xp.sum(w, axis=-1, keepdims=True)  # (a library without in-place operators makes a new array)
        return w
    p = w / xp.sum(w, axis=-1, keepdims=True)
    return p if w is e else xp.astype(p, logits.dtype)


def _check_probabilities(xp, p) -> None:
    """Rows non-negative and summing to 1 within ``max(1e-3, 2 eps)`` of the dtype, the sum taken in at least
    float32 (a half-precision softmax's entries are each within half an ulp, so its rows miss 1 by at most
    about ``eps / 2`` whatever the number of classes; the sum in the dtype itself would add an error that
    grows with it, and a tolerance scaled by the classes let rows summing to 5 through)."""
    eps = float(xp.finfo(p.dtype).eps)
    tol = max(1e-3, 2.0 * eps)
    wide = p if xp.finfo(p.dtype).bits >= 32 else xp.astype(p, xp.float32)
    if bool(xp.any(p < 0)) or bool(xp.any(xp.abs(xp.sum(wide, axis=1) - 1.0) > tol)):
        raise ValueError(f"logits must hold probabilities (non-negative rows summing to 1 within {tol:.3g}) "
                         "when from_probabilities=True")


def _onehot(xp, labels, C: int, dtype):
    cls = xp.arange(C, device=device_of(labels))
    return xp.astype(labels[:, None] == cls[None, :], dtype)


def _row_entries(xp, a, cols):
    """``a[i, cols[i]]`` for every row i of the (n, C) array ``a``: one gather through the flat array (the
    array API has no take_along_axis before 2024.12), differentiable where ``take`` is."""
    n, C = a.shape
    it = index_dtype(xp)  # (int32 labels times C would overflow past 2^31 entries)
    if n * C > int(xp.iinfo(it).max):  # (JAX without x64 indexes in int32): the entry summed with zeros, its value
        pick = xp.arange(C, device=device_of(a), dtype=cols.dtype)[None, :] == cols[:, None]
        return xp.sum(xp.where(pick, a, xp.zeros_like(a)), axis=1)
    at = xp.arange(n, device=device_of(a), dtype=it) * C + xp.astype(cols, it)
    return xp.take(xp.reshape(a, (-1,)), at, axis=0)


def _checked(logits, labels, from_probabilities):
    """The public functions' checks of ``logits`` (finite (n, C) real floating; probabilities when
    ``from_probabilities``) and ``labels`` ((n,) in [0, C)): ``(xp, labels, from_probabilities as a bool)``."""
    xp = namespace(logits, labels, names=("logits", "labels"))
    check_float_matrix(xp, logits, "logits")
    n, C = logits.shape
    labels = check_labels(xp, labels, n, of="logits", classes=C)
    flag = _flag(from_probabilities)
    if flag:
        _check_probabilities(xp, logits)
    return xp, labels, flag


def cross_entropy(logits, labels, *, from_probabilities: bool = False):
    """Per-example cross-entropy (n,) from logits (stable log-sum-exp) or from probabilities.

    From probabilities a probability below the dtype's smallest normal number (zero included) counts as
    that number, so the loss is finite: at most 708.4 in float64, 87.3 in float32 (from logits an
    overflowing loss is ``inf``).

    Examples
    --------
    >>> import numpy as np
    >>> logits = np.array([[0.0, 0.0], [0.0, np.log(3.0)]])
    >>> labels = np.array([0, 1])
    >>> np.round(cross_entropy(logits, labels), 4)
    array([0.6931, 0.2877])
    >>> np.round(cross_entropy(softmax(logits), labels, from_probabilities=True), 4)
    array([0.6931, 0.2877])
    """
    xp, labels, from_probabilities = _checked(logits, labels, from_probabilities)
    if from_probabilities:
        p = _row_entries(xp, logits, labels)
        tiny = xp.finfo(logits.dtype).smallest_normal
        return -xp.log(xp.maximum(p, xp.full_like(p, tiny)))
    return _logits_cross_entropy(xp, logits, labels)


def _logits_cross_entropy(xp, logits, labels, shifted=None):
    """:func:`cross_entropy` of logits already checked (finite, (n, C), labels (n,) in [0, C) of the logits'
    namespace): the controller's, whose forward checked them. One exponential over the logits; ``shifted``:
    :func:`_shifted` of them, if computed already."""
    C = logits.shape[1]
    z, e = _shifted(xp, logits) if shifted is None else shifted
    # log(sum_j exp(z_j)) as log1p of the sum without the top entry's 1: log(1 + s) rounded 1 + s first, so a
    # confident example's loss came out as a multiple of the dtype's epsilon, 0 below it (float32: every loss
    # under 6e-8; review 83), where log1p keeps it to the dtype's precision. The top entry enters as
    # expm1(z_top), 0 in value: so the log-sum-exp is differentiated as one (a constant 1 there gave a wrong
    # autograd gradient wherever the largest logit is tied, as at a zero-initialised last layer: review 134;
    # the shift's own gradient cancels against the label's term). Summed in at least float32. The top entries'
    # expm1 taken on them alone (gathered, then put in place by the mask): an expm1 over the whole array beside
    # the exponential took a third of the time at 10^3 classes.
    first = xp.argmax(logits, axis=1)
    top = xp.arange(C, device=device_of(logits), dtype=first.dtype)[None, :] == first[:, None]
    rest = xp.sum(accumulating(xp, xp.where(top, xp.expm1(_row_entries(xp, z, first))[:, None], e)), axis=1)
    # the label's entry picked, not z * onehot summed: a class far below the top (finite logits 2e38 apart in
    # float32) shifts to -inf, and -inf * 0 is NaN where the loss is 0
    loss = xp.log1p(rest) - accumulating(xp, _row_entries(xp, z, labels))
    return xp.astype(loss, logits.dtype) if int(xp.finfo(logits.dtype).bits) < 32 else loss


def last_layer_gradients(logits, labels, *, embeddings=None, from_probabilities: bool = False):
    """Per-example gradient of the cross-entropy loss with respect to the last layer.

    Parameters
    ----------
    logits : (n, C) real floating array: the model's logits, or probabilities when
        ``from_probabilities=True`` (rows non-negative, summing to 1 within 1e-3, or twice the dtype's
        eps where that is larger: bfloat16's 0.0156, float16's 0.002).
    labels : (n,) integer array in the same namespace, values in [0, C).
    embeddings : optional (n, h) penultimate-layer features (same namespace and dtype). When given the
        result is the gradient with respect to the last linear layer's weight matrix W (C, h),
        flattened row-major to (n, C * h): ``g[i, c * h + k] = (p_ic - [y_i = c]) e_ik``. Only this
        output is materialised.

    Returns
    -------
    (n, C) (or (n, C * h)) array of logits' dtype, namespace and device: ``softmax(z) - onehot(y)``.

    Examples
    --------
    Three examples of a two-class problem; the gradient is small where the model is confident and
    right, large where it is wrong:

    >>> import numpy as np
    >>> logits = np.array([[0.0, 0.0], [0.0, np.log(3.0)], [np.log(3.0), 0.0]])
    >>> labels = np.array([0, 1, 1])
    >>> last_layer_gradients(logits, labels)
    array([[-0.5 ,  0.5 ],
           [ 0.25, -0.25],
           [ 0.75, -0.75]])

    With the penultimate features the rows are the gradients of the last layer's weights (C * h):

    >>> last_layer_gradients(logits, labels, embeddings=np.ones((3, 4))).shape
    (3, 8)
    """
    namespace(logits, labels, embeddings, names=("logits", "labels", "embeddings"))  # (one library for all three)
    xp, labels, from_probabilities = _checked(logits, labels, from_probabilities)
    return _gradient_features(xp, logits, labels, embeddings, from_probabilities)


def _gradient_features(xp, logits, labels, embeddings=None, from_probabilities: bool = False, exps=None):
    """:func:`last_layer_gradients` of logits (or probabilities) and labels already checked (finite, (n, C),
    labels (n,) in [0, C) of the logits' namespace): the controller's, whose forward checked them; the
    embeddings are checked here. ``exps``: the exponentials of :func:`_shifted`, if computed already."""
    n, C = logits.shape
    p = logits if from_probabilities else _softmax(xp, logits, exps)
    g = p - _onehot(xp, labels, C, logits.dtype)
    if embeddings is None:
        return g
    check_float_matrix(xp, embeddings, "embeddings")
    if embeddings.shape[0] != n:
        raise ValueError(f"embeddings has {embeddings.shape[0]} rows but logits has {n}")
    if embeddings.dtype != logits.dtype:
        raise TypeError(f"embeddings dtype {embeddings.dtype} differs from logits dtype {logits.dtype}")
    h = embeddings.shape[1]
    return xp.reshape(g[:, :, None] * embeddings[:, None, :], (n, C * h))
