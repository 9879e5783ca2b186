"""Boundary checks shared by the public functions. Every error names the offending argument."""

from __future__ import annotations

import dataclasses
import math
import numbers

from typing import Any

import numpy as np

from ._compat import float_errors_quiet, index_dtype, to_numpy
from .backends import is_choice


# frameworks whose code calls into ours on the way from the user's line (a fit loop, a DataLoader)
_FRAMEWORKS = ("keras", "torch", "lightning", "pytorch_lightning", "transformers", "accelerate")


def user_stacklevel(skip: tuple[str, ...] = ()) -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that names the first
    frame outside the library (any module ``crestcore.*``, the adapters and backends included, wherever
    their files lie), outside the frameworks that call into it (keras, torch, lightning, transformers,
    accelerate: a fit loop, a DataLoader) and outside the modules named by the prefixes ``skip``: the
    user's line, however deep the calls go.

    >>> user_stacklevel() >= 1
    True
    """
    import sys

    prefixes = ("crestcore.", *(p if p.endswith(".") else p + "." for p in (*_FRAMEWORKS, *skip)))
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and (str(frame.f_globals.get("__name__", "")) + ".").startswith(prefixes):
        frame, level = frame.f_back, level + 1
    return level


def masked_outputs_error(rows: int, total: int) -> ValueError:
    """The error for a model's outputs whose only non-finite entries are ``-inf`` (a mask of classes, not a
    divergence): ``rows`` of the ``total`` rows measured hold one.

    Examples
    --------
    >>> str(masked_outputs_error(3, 8)).split(":")[1]
    " the model's outputs hold -inf in 3 of 8 rows (and no NaN or +inf), e.g. a mask of unused classes"
    """
    return ValueError(
        f"CREST: the model's outputs hold -inf in {rows} of {total} rows (and no NaN or +inf), e.g. a mask of "
        "unused classes: CREST's measurements (softmax features, per-example losses, the quadratic model's fit) "
        "take finite logits. Mask with a large finite negative value instead, e.g. logits.masked_fill(mask, -1e4) "
        "(finite in every float dtype; its softmax share underflows to 0, as -inf's is 0)")


class DivergenceError(FloatingPointError, ValueError):
    """Non-finite numbers where a finite computation was expected (a diverged model, an overflowing
    estimate). A ``FloatingPointError`` (what the adapters document and annotate with the step), and a
    ``ValueError`` for code that caught the ``ValueError`` these checks used to raise.

    Examples
    --------
    >>> import numpy as np
    >>> from crestcore import quadratic_anchor, quadratic_init
    >>> state = quadratic_init(np.zeros(2))
    >>> try:
    ...     quadratic_anchor(state, float("nan"))
    ... except FloatingPointError as exc:
    ...     print(type(exc).__name__, isinstance(exc, ValueError))
    DivergenceError True
    """


def isdtype(xp, dtype, kind: str) -> bool:
    """``xp.isdtype(dtype, kind)``, False for a dtype the library does not know as one of its own (NumPy
    raises ``TypeError`` for an extension dtype such as ml_dtypes' bfloat16): the callers then refuse it
    with their own message, which names the argument. NumPy's extended precision (``np.longdouble``, float128 on
    x86-64) is no real floating dtype here either: the library computes in float16 to float64 only, and its
    checks read maxima as Python floats (review 177: finite float128 values of 1e400 were refused as "NaN or
    infinite")."""
    try:
        if kind == "real floating" and isinstance(dtype, np.dtype) and dtype.kind == "f" and dtype.itemsize > 8:
            return False
        return bool(xp.isdtype(dtype, kind))
    except TypeError:
        return False


_HOST_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def not_floating(name: str, dtype) -> TypeError:
    """The error for an array ``name`` of a dtype that is not real floating; a NumPy bfloat16 (ml_dtypes)
    array, which NumPy does not count as floating, is told what to do instead.

    Examples
    --------
    >>> import numpy as np
    >>> not_floating("X", np.dtype(np.int64))
    TypeError('X must have a real floating dtype (float16, bfloat16, float32 or float64), got int64')
    """
    if getattr(dtype, "name", "") == "bfloat16":  # NumPy's bfloat16 from ml_dtypes: not a NumPy float
        return TypeError(f"{name} is a NumPy bfloat16 array (ml_dtypes), which NumPy's array API does not "
                         "count as floating: cast it to float32 (backend='numba', where a function has it, does "
                         "that itself), or pass a torch or jax bfloat16 array")
    return TypeError(f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64), got {dtype}")


def check_float_matrix(xp, X, name: str, *, square: bool = False) -> float:
    """X must be a finite, non-empty, 2-D real floating array. Returns ``max|X|`` (the numerics policy's
    rescaling needs it): one max and one min over X, no temporaries (NaN propagates through both), or for
    a host float32/float64 array in one block, where Numba is loaded already, the ``finite_abs_max`` host
    kernel's one pass over the bits (the same value)."""
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got {X.ndim}-D with shape {tuple(X.shape)}")
    n, d = X.shape
    if n == 0 or d == 0:
        raise ValueError(f"{name} is empty (shape {tuple(X.shape)})")
    if square and n != d:
        raise ValueError(f"{name} must be a square (n, n) similarity matrix, got shape {tuple(X.shape)}")
    if not isdtype(xp, X.dtype, "real floating"):
        raise not_floating(name, X.dtype)
    if type(X) in (np.ndarray, np.memmap) and X.dtype in _HOST_FLOATS:
        # a host array, where the Numba backend is loaded already: one pass over the bits (a max and a min are
        # two); in one block when it is one and writeable, else (a strided view, a read-only one: np.load(
        # mmap_mode="r")'s, compiled as another type) in contiguous copies of blocks of rows (a max and a min over
        # a column slice of 10^6 x 64 took 0.28 s: review 129); the NumPy reference where Numba is not loaded,
        # whose result is the same
        from crestcore.backends import get_host_kernel

        kern = get_host_kernel("finite_abs_max", start=False)
        if kern is not None:
            if X.flags.writeable and (X.flags.c_contiguous or X.flags.f_contiguous):
                amax = kern(X)
            else:
                step = max(1, (1 << 18) // d)  # blocks of about 2 MiB of float64
                amax = max(kern(np.array(X[i: i + step], order="C")) for i in range(0, n, step))
            if not math.isfinite(amax):
                raise ValueError(f"{name} contains NaN or infinite values")
            return amax
    if type(X) in (np.ndarray, np.memmap) and X.dtype == np.float16:
        return _half_abs_max(X, name)
    hi = float(to_numpy(xp.max(X)))  # to_numpy: detached (a tensor that requires grad warns on float())
    lo = float(to_numpy(xp.min(X)))
    if not (math.isfinite(hi) and math.isfinite(lo)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return max(hi, -lo)


def _half_abs_max(X: np.ndarray, name: str) -> float:
    """``max|X|`` of a host float16 array (a ``ValueError`` naming ``name`` if an entry is NaN or infinite) from
    two integer maxima over its bits, no temporaries: NumPy's float16 max and min convert every entry and took
    0.68 s on 10^6 x 64 (review 129). As int16 the non-negative floats are the non-negative ints in the order
    of their magnitudes; as uint16 the negative ones are ``0x8000 + magnitude``, above every non-negative one."""
    s, u = X.view(np.int16), X.view(np.uint16)
    mags = []
    top = int(s.max())
    if top >= 0:
        mags.append(top)
    top = int(u.max())
    if top >= 0x8000:
        mags.append(top - 0x8000)
    m = max(mags)
    if m >= 0x7C00:  # the exponent all ones: infinite or NaN
        raise ValueError(f"{name} contains NaN or infinite values")
    return float(np.array(m, dtype=np.uint16).view(np.float16))


def all_finite(xp, x) -> bool:
    """Whether every entry of the array ``x`` is finite: one sum (finite only when every entry is, since an
    infinity or a NaN makes it infinite or NaN), the entrywise test only when the sum is not finite (finite
    entries whose sum overflowed). ``xp.all(xp.isfinite(x))``'s answer without its boolean array: at
    2048 x 10,000 float32 logits, 3 ms against 135 ms on one CPU thread (torch), and 6 against 18 us at 600 x 10
    (review 171). Half and narrower floats take the entrywise test directly.

    >>> import numpy as np
    >>> all_finite(np, np.array([[1.0, -2.0], [3.0, 4.0]])), all_finite(np, np.array([1.0, np.nan]))
    (True, False)
    >>> all_finite(np, np.array([3e38, 3e38], dtype=np.float32))  # the sum overflows, the entries are finite
    True
    """
    # half and narrower floats (float16, bfloat16, float8) take the entrywise test: their sums overflow at
    # small sizes, NumPy sums float16 slowly, and torch has no CPU sum for float8 (review 174)
    if getattr(x.dtype, "itemsize", 8) > 2:
        with float_errors_quiet():  # (NumPy's overflow warning of a sum of finite entries: not the user's concern)
            if bool(xp.isfinite(xp.sum(x))):  # (a boolean of no graph: float() of a sum that requires grad warns)
                return True
    return bool(xp.all(xp.isfinite(x)))


def check_float_rows(xp, A, name: str, layout: str) -> None:
    """A must be a 2-D real floating array with at least one row, every entry finite (``layout`` words the
    expected array in the shape error, e.g. ``"(k, D) array"``). Unlike :func:`check_float_matrix` it
    computes no ``max|A|`` and allows zero columns."""
    if A.ndim != 2 or A.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty {layout}, got shape {tuple(A.shape)}")
    if not isdtype(xp, A.dtype, "real floating"):
        raise not_floating(name, A.dtype)
    if not all_finite(xp, A):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_int(value, name: str, *, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (bools refused); the errors name the argument ``name``.

    Examples
    --------
    >>> check_int(5, "k")
    5
    >>> check_int(0, "k")
    Traceback (most recent call last):
    ...
    ValueError: k must be >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if v < low or (high is not None and v > high):
        rng = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def check_count(value, name: str, *, low: int = 1, optional: bool = False):
    """``value`` must be an integer (not a bool) of at least ``low`` (1: "positive", 0: "non-negative"),
    or None when ``optional``; else a ``ValueError`` naming ``name``. Returns it as an int (or None).

    Examples
    --------
    >>> check_count(3, "epochs"), check_count(None, "epochs", optional=True)
    (3, None)
    >>> check_count(0, "m")
    Traceback (most recent call last):
    ...
    ValueError: m must be a positive integer, got 0
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        kind = "positive" if low == 1 else "non-negative"
        raise ValueError(f"{name} must be a {kind} integer{' or None' if optional else ''}, got {value!r}")
    return int(value)


def check_choice(value, name: str, choices) -> str:
    """``value`` when it is one of ``choices``; the error names the argument ``name`` and the choices.

    Examples
    --------
    >>> check_choice("lazy", "optimizer", ("naive", "lazy"))
    'lazy'
    >>> check_choice("lazzy", "optimizer", ("naive", "lazy"))
    Traceback (most recent call last):
    ...
    ValueError: optimizer must be one of ('naive', 'lazy'), got 'lazzy'
    """
    if not is_choice(value, choices):  # (not `value in choices`: an array there fails on its truth value)
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_epsilon(epsilon) -> float:
    """The stochastic greedy's ``epsilon`` as a float in (0, 1); the errors name it.

    Examples
    --------
    >>> check_epsilon(0.1)
    0.1
    >>> check_epsilon(2)
    Traceback (most recent call last):
    ...
    ValueError: epsilon must be in (0, 1), got 2
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a number in (0, 1), got {type(epsilon).__name__}")
    e = float(epsilon)
    if not (0.0 < e < 1.0):
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon!r}")
    return e


def check_labels(xp, labels, n: int, name: str = "labels", *, of: str | None = None,
                 classes: int | None = None):
    """``labels`` must be 1-D integers, one per example (``n`` of them); the errors name the argument
    ``name`` and, when ``of`` is given, the array whose ``n`` rows they label. With ``classes`` (the
    columns of ``of``) every label must also lie in ``[0, classes)``. Returns the labels for use in
    their library: unsigned ones (torch's uint16-64 have no ordering, promotion or indexing) as the
    library's index dtype, a value past its range wrapping below 0 and so refused; others as they are."""
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        counted = f"there are {n} examples" if of is None else f"{of} has {n} rows"
        raise ValueError(f"{name} has length {labels.shape[0]} but {counted}")
    if not isdtype(xp, labels.dtype, "integral"):
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if classes is None:
        return labels
    if isdtype(xp, labels.dtype, "unsigned integer"):
        labels = xp.astype(labels, index_dtype(xp))
    if n and (bool(xp.any(labels < 0)) or bool(xp.any(labels >= classes))):
        raise ValueError(f"{name} must lie in [0, {classes}) for {classes} classes ({of} has {classes} columns)")
    return labels


def labels_to_host(xp, labels, n: int, name: str = "labels") -> np.ndarray:
    """Integer labels (n,) -> host int64 array (one transfer); unsigned labels above int64's range are
    refused (they would wrap to negative values and reorder the classes)."""
    check_labels(xp, labels, n, name)
    return int64_labels(np.asarray(to_numpy(labels)), name, copy=False)


def int64_labels(labels: np.ndarray, name: str = "labels", *, copy: bool = True) -> np.ndarray:
    """Integer labels, one per example, as a host int64 array (a copy unless ``copy=False``; a list or another
    library's array is brought to the host first). Labels that are not a 1-D array of integers (floats, even
    integral ones, booleans, strings) are refused with a ``TypeError`` or ``ValueError`` naming ``name`` (review
    155: they were cast, 0.7 to 0 and NaN to -2^63); unsigned labels above 2^63 - 1 are refused: the cast would
    wrap them to negative values and reorder the classes.

    Examples
    --------
    >>> import numpy as np
    >>> int64_labels(np.array([3, 1], dtype=np.uint8))
    array([3, 1])
    >>> int64_labels(np.array([1, 2**63 + 5], dtype=np.uint64), "y")
    Traceback (most recent call last):
        ...
    ValueError: y holds values above 2^63 - 1 (uint64), which int64 class positions cannot hold in order: ...
    >>> int64_labels(np.array([0.0, 1.0]))
    Traceback (most recent call last):
        ...
    TypeError: labels must hold integer class indices, got dtype float64
    """
    if not isinstance(labels, np.ndarray):
        labels = np.asarray(to_numpy(labels))
        copy = False  # (a new array already)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, one class index per example, got shape {labels.shape}")
    if labels.dtype == np.uint64 and labels.size and int(labels.max()) > np.iinfo(np.int64).max:
        raise ValueError(
            f"{name} holds values above 2^63 - 1 (uint64), which int64 class positions cannot hold in order: "
            f"pass class numbers instead, e.g. numpy.unique({name}, return_inverse=True)[1]"
        )
    return labels.astype(np.int64, copy=copy)


def make_rng(rng, name: str = "rng") -> np.random.Generator:
    """A NumPy Generator from a seed or Generator; nothing else (no hidden global RNG)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, bool) or rng is None:
        # (None: no hidden global RNG stands in; the call draws, so it needs a seed of the caller's, review 90)
        need = " (this call draws random numbers, and none come from a global RNG: pass a seed)" if rng is None else ""
        raise TypeError(f"{name} must be an int seed or a numpy.random.Generator, got {rng!r}{need}")
    if isinstance(rng, numbers.Integral):
        if int(rng) < 0:
            raise ValueError(f"{name} seed must be non-negative, got {int(rng)}")
        return np.random.default_rng(int(rng))
    if isinstance(rng, np.random.SeedSequence):
        return np.random.default_rng(rng)
    # the type's public module too: a torch.Generator read "must be a numpy.random.Generator, got Generator"
    # (review 122)
    kind = type(rng)
    module = ".".join(p for p in kind.__module__.split(".") if not p.startswith("_"))
    what = kind.__qualname__ if module in ("", "builtins") else f"{module}.{kind.__qualname__}"
    raise TypeError(f"{name} must be an int seed or a numpy.random.Generator, got {what}")


_INT64_MAX = int(np.iinfo(np.int64).max)


def _group_sizes(sizes, total: int = 0) -> np.ndarray:
    """``sizes`` as int64, refused where the exact integer arithmetic of a split of ``total`` over them (``total *
    size``, their sum) would pass int64's range (it wrapped: ``hamilton(2**40, [2**40, 2**30])`` gave [1, 1],
    review 134)."""
    raw = np.asarray(sizes)
    if raw.ndim != 1 or (raw.size and (not np.issubdtype(raw.dtype, np.integer) or raw.min() < 0)):
        raise ValueError(f"sizes must be a 1-D array of non-negative integers, got shape {raw.shape} and "
                         f"dtype {raw.dtype}")
    if raw.size:
        top = int(raw.max())
        if top * max(int(total), raw.size) > _INT64_MAX:
            raise ValueError(f"sizes up to {top} over {raw.size} groups with total={int(total)} are beyond the exact "
                             "int64 arithmetic of the split (total * size and the sizes' sum must stay below 2^63)")
    return raw.astype(np.int64)


def hamilton(total: int, sizes: np.ndarray) -> np.ndarray:
    """Split ``total`` over groups proportionally to ``sizes`` (largest-remainder / Hamilton method).

    Each group gets ``floor(total * n_c / n)``, then the leftover units go to the largest fractional
    remainders (ties: the lower group). When ``total >= len(sizes)`` every non-empty group gets at least
    one unit, taken from the groups with the most units. Never more than ``sizes[c]`` per group when
    ``total <= sum(sizes)``.

    Examples
    --------
    >>> hamilton(10, [50, 30, 20]).tolist()
    [5, 3, 2]
    >>> hamilton(3, [10, 5, 1]).tolist()  # every non-empty class gets one
    [1, 1, 1]
    """
    total = check_int(total, "total", low=0)
    sizes = _group_sizes(sizes, total)
    n = int(sizes.sum())
    if n == 0:
        return np.zeros_like(sizes)
    prod = int(total) * sizes  # exact integer arithmetic: equal remainders really tie
    base = prod // n
    rem = prod % n
    left = int(total) - int(base.sum())
    order = np.lexsort((np.arange(sizes.size), -rem))
    base[order[:left]] += 1
    nonempty = sizes > 0
    if total >= int(nonempty.sum()):
        for c in np.flatnonzero(nonempty & (base == 0)):
            donor = int(np.argmax(np.where(base > 1, base, -1)))
            if base[donor] <= 1:
                break
            base[donor] -= 1
            base[c] += 1
    return base


def check_class_budgets(budgets, sizes, total: int, name: str = "class_budgets") -> np.ndarray:
    """A caller's per-class split of ``total`` picks: a 1-D integer sequence with one entry per class
    present (ascending label order), each in ``[0, class size]``, adding up to ``total``; host int64.

    >>> check_class_budgets([2, 0, 1], np.array([5, 1, 4]), 3).tolist()
    [2, 0, 1]
    >>> check_class_budgets([2, 2], np.array([5, 1]), 4)
    Traceback (most recent call last):
    ...
    ValueError: class_budgets[1] is 2, more than its class's 1 examples
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    b = np.asarray(budgets)
    if b.ndim != 1 or b.shape[0] != sizes.size:
        raise ValueError(f"{name} must hold one count per class present ({sizes.size}, ascending labels), "
                         f"got shape {b.shape}")
    if b.dtype == bool or not np.issubdtype(b.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {b.dtype}")
    b = b.astype(np.int64)
    if b.size and b.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {b.tolist()}")
    over = np.flatnonzero(b > sizes)
    if over.size:
        c = int(over[0])
        raise ValueError(f"{name}[{c}] is {int(b[c])}, more than its class's {int(sizes[c])} examples")
    if int(b.sum()) != int(total):
        raise ValueError(f"{name} add up to {int(b.sum())}, but k is {int(total)}")
    return b


def apportion(total: int, sizes, rng: np.random.Generator, *, at_least_one: bool = False):
    """Split ``total`` over groups proportionally to ``sizes`` with the leftover units drawn at random:
    ``(units, p)``. Group c gets ``floor(q_c)`` or ``ceil(q_c)`` units, ``q_c = total n_c / n``, the
    ceiling with probability ``q_c - floor(q_c)`` exactly (systematic sampling of the fractional parts,
    in exact integer arithmetic, over a random order of the groups), and the units add up to ``total``:
    every group's expected share is its proportional one, where :func:`hamilton` gives the leftover units
    to the same groups every time (on equal remainders, the lowest ones). ``p[c]`` is the probability
    that group c gets at least one unit (1 when ``q_c >= 1``).

    ``at_least_one``: when ``total`` covers the non-empty groups, each of them gets a unit for sure (taken
    from a group with the most units, ties at random), and its ``p`` is 1.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> units, p = apportion(10, np.array([50, 30, 20]), rng)  # q = 5, 3, 2: no leftover units
    >>> units.tolist(), p.tolist()
    ([5, 3, 2], [1.0, 1.0, 1.0])
    >>> draws = np.array([apportion(2, np.array([5, 5, 5, 5]), rng)[0] for _ in range(4000)])
    >>> bool(np.all(draws.sum(axis=1) == 2))  # two units, each group's half on average
    True
    >>> bool(np.all(np.abs(draws.mean(axis=0) - 0.5) < 0.04))
    True
    """
    total = check_int(total, "total", low=0)
    sizes = _group_sizes(sizes, total)
    rng = make_rng(rng)
    if not isinstance(at_least_one, bool):
        raise TypeError(f"at_least_one must be a bool, got {type(at_least_one).__name__}")
    n = int(sizes.sum())
    if n == 0:
        return np.zeros_like(sizes), np.ones(sizes.size)
    prod = int(total) * sizes  # exact: q_c = prod / n
    units = prod // n
    rem = prod % n
    left = int(total) - int(units.sum())  # = sum(rem) / n
    p = np.where(units > 0, 1.0, rem / n)
    if left:
        order = rng.permutation(sizes.size)
        hi = np.cumsum(rem[order])
        lo = hi - rem[order]
        u = int(rng.integers(n))  # thresholds u, u + n, ..., u + (left - 1) n on the line of remainders

        def below(x):  # thresholds < x
            return np.maximum(0, (x - u + n - 1) // n)

        units[order] += below(hi) - below(lo)  # rem < n: at most one threshold in each group's stretch
    if at_least_one:
        nonempty = sizes > 0
        if total >= int(nonempty.sum()):
            for c in np.flatnonzero(nonempty & (units == 0)):
                most = int(units.max())
                if most <= 1:
                    break
                donors = np.flatnonzero(units == most)
                units[donors[int(rng.integers(donors.size))]] -= 1
                units[c] += 1
            p = np.where(nonempty & (units > 0), 1.0, p)
    return units, p


def host_indices(indices, n: int, name: str = "indices") -> np.ndarray:
    """A 1-D host int64 array of example indices in [0, n) (adapters' boundary check).

    >>> host_indices([3, 0, 2], 4)
    array([3, 0, 2])
    >>> host_indices([4], 4)
    Traceback (most recent call last):
    ...
    IndexError: indices must lie in [0, 4)
    """
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"{name} must be a 1-D integer array, got shape {idx.shape} and dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"{name} must lie in [0, {n})")
    return idx.astype(np.int64, copy=False)


def host_weights(weights, k: int, name: str = "weights") -> np.ndarray:
    """A finite host float64 vector of k per-example weights (adapters' boundary check).

    >>> host_weights([1, 0.5], 2)
    array([1. , 0.5])
    >>> host_weights([1.0, float("nan")], 2, name="w")
    Traceback (most recent call last):
    ...
    ValueError: w contain NaN or infinite values
    """
    try:
        w = np.asarray(to_numpy(weights))
    except TypeError as exc:  # (a list of Decimals: to_numpy's message named nothing, review 160)
        if not isinstance(weights, (list, tuple)):
            raise TypeError(f"{name} must be real numbers (an array, a tensor or a list of numbers), got "
                            f"{type(weights).__name__}: {exc}") from None
        w = np.empty(len(weights), dtype=object)  # a list of numbers NumPy does not know (Fractions): read below
        w[:] = list(weights)
    if w.dtype.kind == "O" and all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                                   for v in w.flat):
        w = w.astype(np.float64)  # an object array of real numbers (Fractions, floats: review 160)
    if w.dtype.kind in "bcUSOMm":  # (ml_dtypes' bfloat16, kind "V", is a real number too: review 159)
        # (strings were parsed, booleans taken as 0/1 and complex values cut to their real parts: review 155)
        raise TypeError(f"{name} must be real numbers, got dtype {w.dtype}")
    w = w.astype(np.float64)
    if w.shape != (k,):
        raise ValueError(f"{name} must have shape ({k},) like the indices, got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} contain NaN or infinite values")
    return w


# ------------------------------------------------------------------------------------------------
# config fields (dataclass __post_init__): every error names the field, types are checked before values
# ------------------------------------------------------------------------------------------------


class FieldTypeError(TypeError, ValueError):
    """A config field of the wrong type. Also a ``ValueError``: configs always raised ``ValueError`` for
    bad fields, and code catching that keeps working."""


def field_int(owner: str, name: str, value, *, low: int = 1, optional: bool = False) -> None:
    """An integer field (not a bool) >= low, or None when optional. TypeError / ValueError name it."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an integer" + (" or None" if optional else "")
        raise FieldTypeError(f"{owner}.{name} must be {what}, got {type(value).__name__} {value!r}")
    if int(value) < low:
        raise ValueError(f"{owner}.{name} must be an integer >= {low}, got {int(value)}")


def field_real(owner: str, name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """A finite real field (not a bool) in the stated interval, or None when optional."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        what = "a real number" + (" or None" if optional else "")
        raise FieldTypeError(f"{owner}.{name} must be {what}, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = (not np.isfinite(v)
           or (low is not None and (v <= low if low_open else v < low))
           or (high is not None and (v >= high if high_open else v > high)))
    if bad:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (")" if high_open or high is None else "]")
        raise ValueError(f"{owner}.{name} must be a finite number in {interval}, got {value!r}")


def field_choice(owner: str, name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise FieldTypeError(f"{owner}.{name} must be one of {tuple(choices)} (a str), got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {tuple(choices)}, got {value!r}")


def field_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise FieldTypeError(f"{owner}.{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def plain_fields(obj) -> None:
    """Replace a frozen dataclass's NumPy scalar fields (``np.int64(16)``, ``np.float64(0.05)``,
    ``np.True_``) by the Python scalars of the same value, after its validation: a config is then the same
    object, and has the same ``repr``, whether its numbers came from NumPy or were typed (checkpoints compare
    configs by their repr: a resumed run said its config differed from the saved one when only the
    numbers' types did).

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Config:
    ...     m: int = 1
    ...     def __post_init__(self):
    ...         plain_fields(self)
    >>> Config(m=np.int64(16))
    Config(m=16)
    """
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, np.generic):
            object.__setattr__(obj, f.name, v.item())


def field_instance(owner: str, name: str, value, cls) -> None:
    if not isinstance(value, cls):
        raise FieldTypeError(f"{owner}.{name} must be a {cls.__name__}, got {type(value).__name__} {value!r}")


def host_array(value, ndim: int | None = None) -> np.ndarray:
    """A checkpoint's array field on the host, unchecked: nested lists and tuples (a JSON round trip, whose empty
    list stands for an empty array of ``ndim`` dimensions) or any library's array.

    >>> host_array([], 2).shape
    (0, 0)
    """
    if isinstance(value, (list, tuple)):
        a = np.asarray(value)
        if a.size == 0 and ndim is not None and a.ndim != ndim:
            a = a.reshape((0,) * ndim)
        return a
    return np.asarray(to_numpy(value))


def state_array(value, where: str, name: str, ndim: int, kind: str) -> np.ndarray:
    """A checkpoint's array field on the host, checked: ``ndim`` dimensions and ``kind`` "i" (integers),
    "b" (booleans) or "f" (floats); any library's array, or nested lists and tuples (a JSON round trip, whose
    empty list stands for an empty array of ``ndim`` dimensions and any number kind). Anything else (None, a
    dict, a ragged list) is a ``ValueError`` that names the field: ``"{where}: {name} must be ..."``.

    >>> state_array([[1, 2]], "ckpt", "rows", 2, "i")
    array([[1, 2]])
    >>> state_array(None, "ckpt", "rows", 2, "i")
    Traceback (most recent call last):
        ...
    ValueError: ckpt: rows must be a 2-D array (or nested lists), got NoneType
    """
    try:
        a = host_array(value, ndim)
    except (TypeError, ValueError) as e:  # None, a dict, a ragged list: what the field is, not NumPy's words
        raise ValueError(f"{where}: {name} must be a {ndim}-D array (or nested lists), got {type(value).__name__}") \
            from e
    if a.ndim != ndim:
        raise ValueError(f"{where}: {name} must be {ndim}-D, got shape {a.shape}")
    empty_number = a.size == 0 and np.issubdtype(a.dtype, np.number)  # JSON's [] reads back as float64
    ok = {"i": (np.issubdtype(a.dtype, np.integer) and a.dtype != bool) or empty_number, "b": a.dtype == bool,
          "f": np.issubdtype(a.dtype, np.floating) or empty_number}[kind]
    if not ok:
        raise ValueError(f"{where}: {name} has dtype {a.dtype}, expected "
                         f"{dict(i='integer', b='bool', f='floating')[kind]}")
    return a


def stored_batch(record, n: int, where: str):
    """A handed-out batch read back from a checkpoint (a dict with ``indices``, ``weights``,
    ``reselected``), checked: 1-D integer indices in [0, n), finite non-negative weights, one per index.
    Returns ``(indices int64, weights float64, reselected bool)``; ``where`` prefixes the error.

    >>> stored_batch({"indices": [1, 2], "weights": [1.0, 2.0], "reselected": True}, 3, "ckpt")
    (array([1, 2]), array([1., 2.]), True)
    """
    if not isinstance(record, dict) or not {"indices", "weights", "reselected"} <= set(record):
        raise ValueError(f"{where}: a batch must be a dict holding indices, weights and reselected")
    bi = state_array(record["indices"], where, "a batch's indices", 1, "i")
    bw = state_array(record["weights"], where, "a batch's weights", 1, "f")
    if bi.size and (bi.min() < 0 or bi.max() >= n):
        raise ValueError(f"{where}: batch indices must be a 1-D integer array in [0, {n})")
    if bw.shape != bi.shape or not np.all(np.isfinite(bw)) or (bw.size and bw.min() < 0):
        raise ValueError(f"{where}: batch weights must be finite, non-negative and one per index")
    flag = record["reselected"]
    try:  # (None and other objects NumPy cannot hold failed with to_numpy's bare TypeError: review 160)
        v = np.asarray(to_numpy(flag)) if not isinstance(flag, str) and flag is not None else None
    except TypeError:
        v = None
    # a boolean, or 0 / 1, also as a 0-d array (a string "False" read back was True: review 155)
    if v is None or v.shape != () or v.dtype.kind not in "biu" or int(v) not in (0, 1):
        raise ValueError(f"{where}: a batch's reselected must be a boolean, got {flag!r}")
    return bi.astype(np.int64), bw.astype(np.float64), bool(v)
