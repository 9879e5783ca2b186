"""The piecewise-quadratic loss model of CREST.

At an anchor ``w_a`` the loss is modelled as ``F(delta) = L_a + g . delta + 1/2 delta . (h * delta)``
with ``g`` the (weighted coreset) gradient and ``h`` a diagonal curvature, both smoothed by
exponential moving averages over the samples folded in.

Two variants (``QuadraticConfig.variant``):

* ``"hutchinson"`` (default, the paper's intent): ``h`` is the signed Hutchinson estimate
  ``E[z * (H z)]`` of diag(H); EMAs are bias-corrected and restart at every anchor, so ``g`` and ``h``
  are measured at the anchor.
* ``"adahessian"`` (the release): ``h = sqrt(EMA_beta2 of (z * Hz)^2) + 1e-4`` (an RMS, always
  positive), EMAs carried across anchors and bias-corrected by the number of samples folded in so far
  (the release's AdaHessian divides by ``1 - beta^step`` with its step counter kept across anchors).

State is a NamedTuple of arrays (in the parameters' namespace) and numbers: ``quadratic_init`` then
``quadratic_anchor`` / ``quadratic_update`` return new states; nothing is mutated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple
from collections.abc import Callable

import numpy as np

from ._compat import detached, float_errors_quiet, namespace, to_numpy
from .similarity import accumulating as _accumulating
from .similarity import compute_dtype
from ._validation import DivergenceError, all_finite, check_float_rows, field_choice, field_real, isdtype, plain_fields

__all__ = [
    "QuadraticConfig",
    "QuadraticState",
    "hutchinson_diagonal",
    "quadratic_init",
    "quadratic_anchor",
    "quadratic_update",
    "quadratic_predict",
    "quadratic_curvature",
    "curvature_norm",
]

VARIANTS = ("hutchinson", "adahessian")


@dataclass(frozen=True)
class QuadraticConfig:
    """Settings of the quadratic loss model: the EMA rates of the gradient (``beta1``) and of the
    curvature (``beta2``), the ``variant`` (``"hutchinson"`` or ``"adahessian"``) and the ``eps`` the
    adahessian variant adds to its RMS curvature. Checked on construction.

    Examples
    --------
    >>> QuadraticConfig()
    QuadraticConfig(beta1=0.9, beta2=0.999, variant='hutchinson', eps=0.0001)
    >>> QuadraticConfig(variant="adahessian").variant
    'adahessian'
    >>> QuadraticConfig(beta1=1.0)
    Traceback (most recent call last):
        ...
    ValueError: ...beta1...
    """

    beta1: float = 0.9  # gradient EMA
    beta2: float = 0.999  # curvature EMA
    variant: str = "hutchinson"
    eps: float = 1e-4  # added to the adahessian RMS curvature

    def __post_init__(self):
        o = "QuadraticConfig"
        for name in ("beta1", "beta2"):
            field_real(o, name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        field_choice(o, "variant", self.variant, VARIANTS)
        field_real(o, "eps", self.eps, low=0.0)
        plain_fields(self)


class QuadraticState(NamedTuple):
    """The quadratic model's state: the anchor loss, the raw EMAs of the gradient and of the curvature
    samples (flat vectors in the parameters' namespace) and how many samples each EMA holds. Made by
    :func:`quadratic_init`, advanced by :func:`quadratic_anchor` and :func:`quadratic_update`.

    Examples
    --------
    >>> import numpy as np
    >>> state = quadratic_init(np.zeros(3))
    >>> state.n_g, state.n_h, state.g_ema.shape
    (0, 0, (3,))
    >>> quadratic_anchor(state, 2.5).anchor_loss
    2.5
    """

    anchor_loss: float
    g_ema: Any  # (D,) raw EMA of gradients
    h_ema: Any  # (D,) raw EMA of z*Hz (hutchinson) or of (z*Hz)^2 (adahessian)
    n_g: int  # samples folded in since the EMA (re)start, for bias correction
    n_h: int


def _check_vec(xp, v, name, dim=None, *, diverged: bool = False, finite: bool = True):
    if v.ndim != 1:
        raise ValueError(f"{name} must be a 1-D (flat) vector, got shape {tuple(v.shape)}")
    if dim is not None and v.shape[0] != dim:
        raise ValueError(f"{name} has length {v.shape[0]}, expected {dim}")
    if not isdtype(xp, v.dtype, "real floating"):
        raise TypeError(f"{name} must be real floating, got {v.dtype}")
    if finite and not all_finite(xp, v):
        if diverged:
            raise DivergenceError(
                f"{name} contains NaN or infinite values: the model's gradient or curvature is not finite, "
                "training has diverged (lower the learning rate, add gradient clipping, check the data)"
            )
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_same_dtype(xp, v, like, name: str) -> None:
    """The model's vectors keep the accumulation dtype of the parameters ``quadratic_init`` was given (their
    own; float32 for half precision): a sample of another dtype would silently promote them (float32 +
    float64 is float64)."""
    if compute_dtype(xp, v.dtype) != like.dtype:
        raise TypeError(f"{name} has dtype {v.dtype} but the model's vectors are {like.dtype} (from the dtype of "
                        f"the params quadratic_init was given): pass {name} in that dtype")


def hutchinson_diagonal(hvp: Callable[[Any], Any], probes):
    """Hutchinson's estimate of diag(H): the mean over probes z of ``z * hvp(z)``.

    ``hvp(v)`` returns ``H v`` (a caller-supplied Hessian-vector product); ``probes`` is (k, D), usually
    Rademacher (+-1) rows drawn by the caller. Unbiased for Rademacher probes; exact when the probes'
    outer products average to the identity on the diagonal and cancel off it (e.g. all 2^D sign
    vectors, or the rows of a Hadamard matrix).

    Examples
    --------
    The rows of a 4 x 4 Hadamard matrix recover the diagonal of any symmetric 4 x 4 matrix exactly:

    >>> import numpy as np
    >>> H = np.array([[2.0, 1.0, 0.0, 0.0],
    ...               [1.0, 3.0, 0.5, 0.0],
    ...               [0.0, 0.5, 4.0, 1.0],
    ...               [0.0, 0.0, 1.0, 5.0]])
    >>> probes = np.array([[1.0, 1.0, 1.0, 1.0],
    ...                    [1.0, -1.0, 1.0, -1.0],
    ...                    [1.0, 1.0, -1.0, -1.0],
    ...                    [1.0, -1.0, -1.0, 1.0]])
    >>> hutchinson_diagonal(lambda v: H @ v, probes)
    array([2., 3., 4., 5.])
    """
    if not callable(hvp):
        raise TypeError("hvp must be callable: v -> H v")
    probes = detached(probes)
    xp = namespace(probes, names=("probes",))
    check_float_rows(xp, probes, "probes", "(k, D) array")
    acc = None
    out_dtype = probes.dtype  # the estimate's: the probes' and the products' promoted dtype (as z * Hz gives)
    for i in range(probes.shape[0]):
        z = xp.asarray(probes[i, ...], copy=True)  # a copy: an hvp that writes its input leaves probes alone
        hz = detached(hvp(z))  # an autograd product: its graph is not kept in the estimate
        try:
            same_library = namespace(hz, names=("hvp's result",)) is xp
        except TypeError:
            same_library = False
        if not same_library:
            raise TypeError(f"hvp must return an array of the probes' library ({type(probes).__name__}), got "
                            f"{type(hz).__name__}")
        if tuple(hz.shape) != tuple(z.shape):
            raise ValueError(f"hvp returned shape {tuple(hz.shape)} for a probe of shape {tuple(z.shape)}")
        if not all_finite(xp, hz):
            raise DivergenceError(
                f"hvp returned NaN or infinite values for probe {i}: the Hessian-vector product is not "
                "finite (a diverged model?)"
            )
        with float_errors_quiet():  # an overflow is reported as divergence below
            # summed in at least float32 (the numerics policy): a bfloat16 sum stops growing at 256 terms
            # of 1 (300 probes of a diagonal of 1 gave 0.85), a float16 sum overflows where the mean fits
            term = _accumulating(xp, probes[i, ...]) * _accumulating(xp, hz)  # the probe itself, not its copy
            acc = term if acc is None else acc + term
        out_dtype = xp.result_type(out_dtype, hz.dtype)
    with float_errors_quiet():
        mean = acc / probes.shape[0]
        out = mean if mean.dtype == out_dtype else xp.astype(mean, out_dtype)
    if not all_finite(xp, out):
        raise DivergenceError(f"the Hutchinson estimate overflows {out.dtype}: the curvature is not finite")
    return out


def quadratic_init(params) -> QuadraticState:
    """An empty model shaped like the flat parameter vector ``params`` (D,). Its averages are kept in the
    dtype sums are accumulated in: ``params``' own, float32 for float16 and bfloat16 parameters (whose
    samples ``quadratic_update`` takes in their own dtype).

    Examples
    --------
    >>> import numpy as np
    >>> state = quadratic_init(np.zeros(2))
    >>> state.g_ema, state.h_ema
    (array([0., 0.]), array([0., 0.]))
    """
    xp = namespace(params, names=("params",))
    _check_vec(xp, params, "params")
    # the averages are kept in the dtype sums are accumulated in (float32 for half precision): in bfloat16
    # 0.999 * h rounds back to h, and the release's curvature average, kept across anchors, drifted 14 %
    # from a constant 1.0 in 300 selections
    z = _accumulating(xp, xp.zeros_like(params))
    return QuadraticState(anchor_loss=math.nan, g_ema=z, h_ema=xp.zeros_like(z), n_g=0, n_h=0)


def _check_state(state) -> None:
    """The model's state must be a :class:`QuadraticState` (a swapped argument gave an AttributeError about
    ``g_ema``: review 134)."""
    if not isinstance(state, QuadraticState):
        raise TypeError(f"state must be a QuadraticState (from quadratic_init), got {type(state).__name__}")


def quadratic_anchor(state: QuadraticState, loss: float, config: QuadraticConfig = QuadraticConfig()):
    """Start a new piece at a new anchor with anchor loss ``loss``.

    The hutchinson variant restarts its EMAs (g and h are re-measured at the anchor); the adahessian
    variant keeps them, as the release does.

    Examples
    --------
    >>> import numpy as np
    >>> state = quadratic_update(quadratic_init(np.zeros(2)), grad=np.array([1.0, -1.0]))
    >>> fresh = quadratic_anchor(state, 0.7)
    >>> fresh.anchor_loss, fresh.n_g, fresh.g_ema
    (0.7, 0, array([0., 0.]))
    >>> kept = quadratic_anchor(state, 0.7, QuadraticConfig(variant="adahessian"))
    >>> kept.n_g, kept.g_ema
    (1, array([ 0.1, -0.1]))
    """
    _check_state(state)
    complex_array = "complex" in str(getattr(loss, "dtype", ""))
    if loss is None or isinstance(loss, (str, bytes, bool, np.bool_, complex, np.complexfloating)) or (
            hasattr(loss, "shape") and (tuple(loss.shape) not in ((), (1,)) or complex_array)):
        raise TypeError(f"loss must be a real number (the anchor loss), got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if hasattr(loss, "shape") else ""))
    if not isinstance(config, QuadraticConfig):
        raise TypeError(f"config must be a QuadraticConfig, got {type(config).__name__}")
    loss = float(to_numpy(loss).reshape(())) if hasattr(loss, "shape") else float(loss)  # a tensor: detached
    if not math.isfinite(loss):
        raise DivergenceError(f"loss must be finite, got {loss}: the anchor loss is not finite, training has "
                              "diverged (exploding logits?)")
    if config.variant == "hutchinson":
        xp = namespace(state.g_ema)
        return QuadraticState(loss, xp.zeros_like(state.g_ema), xp.zeros_like(state.h_ema), 0, 0)
    return state._replace(anchor_loss=loss)


def quadratic_update(state: QuadraticState, grad=None, zhz=None, config: QuadraticConfig = QuadraticConfig()):
    """Fold one gradient sample and/or one Hutchinson sample ``z * (H z)`` into the EMAs.

    Examples
    --------
    >>> import numpy as np
    >>> state = quadratic_anchor(quadratic_init(np.zeros(2)), 1.0)
    >>> state = quadratic_update(state, grad=np.array([2.0, 0.0]), zhz=np.array([1.0, 4.0]))
    >>> state.n_g, state.n_h
    (1, 1)
    >>> np.round(state.g_ema, 6), np.round(state.h_ema, 6)
    (array([0.2, 0. ]), array([0.001, 0.004]))
    """
    _check_state(state)
    if not isinstance(config, QuadraticConfig):
        raise TypeError(f"config must be a QuadraticConfig, got {type(config).__name__}")
    grad, zhz = detached(grad), detached(zhz)  # the model keeps no autograd graph (a training loop's grew)
    xp = namespace(state.g_ema, grad, zhz, names=("state", "grad", "zhz"))
    D = state.g_ema.shape[0]
    g_ema, h_ema, n_g, n_h = state.g_ema, state.h_ema, state.n_g, state.n_h
    with float_errors_quiet():  # NumPy warns on overflow; it is reported as divergence below
        if grad is not None:
            _check_vec(xp, grad, "grad", D, diverged=True)
            _check_same_dtype(xp, grad, g_ema, "grad")
            g_ema = config.beta1 * g_ema + (1.0 - config.beta1) * _accumulating(xp, grad)
            n_g += 1
        if zhz is not None:
            _check_vec(xp, zhz, "zhz", D, diverged=True)
            _check_same_dtype(xp, zhz, h_ema, "zhz")
            zhz = _accumulating(xp, zhz)
            sample = zhz if config.variant == "hutchinson" else zhz * zhz
            h_ema = config.beta2 * h_ema + (1.0 - config.beta2) * sample
            n_h += 1
    new = QuadraticState(state.anchor_loss, g_ema, h_ema, n_g, n_h)
    # Finite but exploding samples (huge logits) can overflow the EMAs or the curvature's norm (which
    # the trust schedule needs): that is divergence, reported as such rather than as a later failure.
    if grad is not None and not all_finite(xp, g_ema):
        raise DivergenceError(f"the gradient EMA overflows {g_ema.dtype}: training has diverged")
    if zhz is not None:
        if not math.isfinite(curvature_norm(new, config)):
            raise DivergenceError(
                f"the curvature estimate (or its norm) overflows {new.h_ema.dtype}: the Hessian is exploding, "
                "training has diverged (lower the learning rate, add gradient clipping)"
            )
    return new


def curvature_norm(state: QuadraticState, config: QuadraticConfig = QuadraticConfig()) -> float:
    """``||h||``, the Euclidean norm of the curvature vector the model uses, as a Python float,
    accumulated in at least float32 (the trust schedule's ``||H_t||``), with ``h`` scaled by a power of two
    near its largest magnitude first (exact), so that squares that would underflow or overflow the working
    dtype do not (review 155: a float32 curvature near 1e-24 had norm 0, which sent the check interval to its
    cap, and one near 1e19 was refused as overflowing); in between the value is the unscaled sum's, bit for bit.

    Examples
    --------
    >>> import numpy as np
    >>> state = quadratic_update(quadratic_init(np.zeros(2)), zhz=np.array([3.0, 4.0]))
    >>> curvature_norm(state)
    5.0
    """
    _check_state(state)
    xp = namespace(state.h_ema)
    h = _accumulating(xp, quadratic_curvature(state, config))
    top = float(xp.max(xp.abs(h))) if math.prod(h.shape) else 0.0
    if top == 0.0 or not math.isfinite(top):
        return top  # 0, or the non-finite norm the callers report
    # a power of two at or below the largest magnitude (so representable in h's dtype): h / scale is exact,
    # its entries below 2
    scale = math.ldexp(1.0, math.frexp(top)[1] - 1)
    with float_errors_quiet():
        return float(xp.sqrt(xp.sum((h / scale) * (h / scale)))) * scale


def _gradient(state: QuadraticState, config: QuadraticConfig):
    if state.n_g > 0:  # both variants: the release's AdaHessian corrects its EMA's bias too
        return state.g_ema / (1.0 - config.beta1 ** state.n_g)
    return state.g_ema


def quadratic_curvature(state: QuadraticState, config: QuadraticConfig = QuadraticConfig()):
    """The diagonal curvature vector h the model uses.

    Examples
    --------
    The hutchinson variant corrects the EMA's bias, so one sample is the curvature itself:

    >>> import numpy as np
    >>> state = quadratic_update(quadratic_init(np.zeros(2)), zhz=np.array([1.0, 4.0]))
    >>> np.round(quadratic_curvature(state), 6)
    array([1., 4.])
    """
    _check_state(state)
    xp = namespace(state.h_ema)
    h = state.h_ema if state.n_h == 0 else state.h_ema / (1.0 - config.beta2 ** state.n_h)
    if config.variant == "hutchinson":
        return h
    return xp.sqrt(h) + config.eps  # the release: sqrt(EMA / (1 - beta2^step)) + eps


def quadratic_predict(state: QuadraticState, delta, config: QuadraticConfig = QuadraticConfig()) -> float:
    """``F(delta) = L_a + g . delta + 1/2 delta . (h * delta)`` as a Python float (one host sync).

    Examples
    --------
    The loss ``L(w) = 1/2 (w_0^2 + 4 w_1^2)`` anchored at ``w = (1, 1)`` (loss 2.5, gradient (1, 4),
    curvature (1, 4)); the model is exact for a quadratic loss:

    >>> import numpy as np
    >>> state = quadratic_anchor(quadratic_init(np.zeros(2)), 2.5)
    >>> state = quadratic_update(state, grad=np.array([1.0, 4.0]), zhz=np.array([1.0, 4.0]))
    >>> round(quadratic_predict(state, np.array([-0.5, -0.5])), 6)  # loss at w = (0.5, 0.5)
    0.625
    """
    _check_state(state)
    delta = detached(delta)  # (params - anchor of a training loop's parameters: no graph, no torch warning)
    xp = namespace(state.g_ema, delta, names=("state", "delta"))
    _check_vec(xp, delta, "delta", state.g_ema.shape[0], finite=False)
    if not math.isfinite(state.anchor_loss):
        raise ValueError("the model has no anchor yet: call quadratic_anchor first")
    g = _accumulating(xp, _gradient(state, config))
    h = _accumulating(xp, quadratic_curvature(state, config))
    dw = _accumulating(xp, delta)
    with float_errors_quiet():  # an overflow is reported as divergence just below
        val = xp.sum(g * dw) + 0.5 * xp.sum(h * dw * dw)
    out = state.anchor_loss + float(val)
    if not math.isfinite(out):
        # a NaN or infinite entry of delta always makes the sums non-finite (0 * inf is NaN), so delta's
        # own check runs only here: the trust check calls this at every step, on every parameter
        _check_vec(xp, delta, "delta")
        raise DivergenceError(
            f"the quadratic model's prediction is not finite ({out}): the step from the anchor or the "
            "curvature is exploding, training has diverged"
        )
    return out
