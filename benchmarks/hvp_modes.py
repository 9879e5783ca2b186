"""The curvature probe's Hessian-vector product on E3's CNN, three ways, one CPU thread: double backward (what
``TorchModelOps.gradient_and_hutchinson`` runs), forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``)
and double backward with oneDNN off, against the model's own training step (a forward and a backward), on one
coreset of ``--m`` random examples; the three products' largest difference is printed with the times.

    python benchmarks/hvp_modes.py [--m 128] [--repeats 20]

Used for docs/benchmarks.md, E3 (2026-12-06): forward-over-reverse is no faster on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, jvp

    from crestcore.apps.train_demo import build_cnn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_cnn()
    x, y, w = torch.randn(a.m, 1, 28, 28), torch.randint(0, 10, (a.m,)), torch.rand(a.m)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    z = [torch.randint(0, 2, p.shape).float() * 2 - 1 for p in params]  # a Rademacher probe

    def loss_of(out):
        return (w * F.cross_entropy(out, y, reduction="none")).mean()

    def train_step():
        return torch.autograd.grad(loss_of(model(x)), params)

    def double_backward():
        g = torch.autograd.grad(loss_of(model(x)), params, create_graph=True)
        return torch.autograd.grad(sum((gi * zi).sum() for gi, zi in zip(g, z)), params)

    def forward_over_reverse():
        fixed = {n: p.detach() for n, p in zip(names, params)}
        probe = dict(zip(names, z))
        _, hv = jvp(grad(lambda pd: loss_of(functional_call(model, pd, (x,)))), (fixed,), (probe,))
        return [hv[n] for n in names]

    def without_onednn():
        with torch.backends.mkldnn.flags(enabled=False):
            return double_backward()

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(a.repeats):
            fn()
        return (time.perf_counter() - t0) / a.repeats * 1e3

    ref = double_backward()
    diff = max(float((u - v).abs().max()) for other in (forward_over_reverse(), without_onednn())
               for u, v in zip(ref, other))
    rows = [(fn.__name__, timed(fn)) for fn in (train_step, double_backward, forward_over_reverse, without_onednn)]
    print(f"E3 CNN, {a.m} examples, one thread, mean of {a.repeats} calls (largest difference of the products "
          f"from double backward's: {diff:.2e})")
    for name, ms in rows:
        print(f"  {name:22s} {ms:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
