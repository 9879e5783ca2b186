"""Plain helpers shared by the test files (imported as ``_helpers``: tests/ is on ``sys.path``, see conftest.py).

* :func:`to_numpy` -- a host NumPy copy of an array of any library in the test matrix;
* :func:`load_benchmark` -- a script of ``benchmarks/`` as a module, or a skip where the tests run alone;
* :func:`assert_import_stays_light` -- importing some modules in a fresh interpreter loads no heavy one;
* :func:`torch_blobs`, :func:`torch_mlp`, :func:`weighted_step` -- the small classification problem,
  model and training step of the PyTorch adapter tests (torch is imported when they are called);
* :func:`float32_ops` -- a NumPy ModelOps class with float32 parameters, gradient and curvature.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def to_numpy(x) -> np.ndarray:
    """Host NumPy copy of an array of any library in the matrix (0-d arrays stay 0-d)."""
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.detach().cpu().numpy()
    if mod.startswith("cupy"):
        return x.get()
    return np.from_dlpack(x)


def load_benchmark(filename: str, module_name: str) -> ModuleType:
    """``benchmarks/<filename>`` executed as the module ``module_name`` (registered in ``sys.modules``:
    dataclasses look their module up there).

    The benchmarks belong to the source checkout: where they are absent (the wheel's CI copies tests/
    alone and runs them against the installed package) this skips, the whole test module when called
    at its top level.
    """
    path = BENCHMARKS / filename
    if not path.is_file():
        pytest.skip(f"benchmarks/{filename} belongs to the source checkout, not to the installed package",
                    allow_module_level=True)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def fresh_python(code: str, timeout: float = 300) -> list[str]:
    """Run ``code`` in a fresh interpreter (nothing this test process imported is loaded there) and
    return its stdout split into words; a failing child fails the test with its stderr."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split()


def assert_import_stays_light(modules: tuple[str, ...], heavy: tuple[str, ...]) -> None:
    """Importing ``modules`` in a fresh interpreter loads none of the ``heavy`` ones."""
    code = (
        f"import sys, {', '.join(modules)}\n"
        f"heavy = [m for m in {heavy!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------------
# the PyTorch adapter tests' problem, model and training step
# ------------------------------------------------------------------------------------------------
def torch_blobs(n: int, d: int, classes: int, *, seed: int = 0, noise: float = 0.3, dtype=None):
    """``(X (n, d), y (n,))``: Gaussian inputs labelled by a random linear map plus ``noise`` Gaussian
    noise on the scores, all drawn from a ``torch.Generator`` seeded with ``seed`` (``dtype``: torch's
    default when None)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    W = torch.randn(d, classes, generator=g, dtype=dtype)
    y = (X @ W + noise * torch.randn(n, classes, generator=g, dtype=dtype)).argmax(1)
    return X, y


def torch_mlp(d_in: int, classes: int, *, seed: int = 0, bn: bool = True, dropout: bool = False):
    """``Linear(d_in, 16)``, [``BatchNorm1d``], ``ReLU``, [``Dropout(0.5)``], ``Linear(16, classes)``,
    initialised after ``torch.manual_seed(seed)``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(16, classes))
    return nn.Sequential(*layers)


def weighted_step(model, opt, x, y, w):
    """One step of the user's loop: per-example cross-entropy, the ``w``-weighted mean, backward, the
    optimizer's step. Returns the per-example losses (what the loaders ``observe``)."""
    import torch.nn.functional as F

    losses = F.cross_entropy(model(x), y, reduction="none")
    opt.zero_grad()
    (w * losses).mean().backward()
    opt.step()
    return losses


def float32_ops(base):
    """``base`` (a ModelOps class over float64 NumPy arrays, e.g. ``crestcore.controller._SoftmaxOps``) with
    float32 parameters, gradient and curvature."""

    class Float32(base):
        def params(self):
            return super().params().astype(np.float32)

        def gradient(self, indices, weights):
            loss, g = super().gradient(indices, weights)
            return loss, g.astype(np.float32)

        def hutchinson(self, indices, weights, seed):
            return super().hutchinson(indices, weights, seed).astype(np.float32)

    return Float32
