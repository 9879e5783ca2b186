#!/usr/bin/env python
"""CREST's own work between the model's passes on one intra-op thread, or on the caller's count: E1's CREST run
(``crestcore.apps.train_demo.train_method("crest", ...)``, Fashion-MNIST CNN, torch on the CPU) side by side in one
process, the two settings alternating, every run printed with its time categories and accuracy.

Since 2026-12-06 ``TorchModelOps._bookkeeping_threads`` runs a controller step on one intra-op thread (the
quadratic model's folds and predictions, the trust check's arithmetic, the features, the selection) and gives
the model's passes the caller's ``torch.set_num_threads`` back; ``--rounds`` pairs of runs compare it with the
behaviour before (every operation on the caller's count), switched by the module flag
``crestcore.adapters.torch._ONE_THREAD_BOOKKEEPING``. The batches and the models must come out the same (the
accuracy column); the wall clock and the categories show where the time moved.

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/bookkeeping_threads.py --rounds 3 [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import _warm_up, positive_int  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=positive_int, default=3, help="pairs of runs (default: %(default)s)")
    ap.add_argument("--threads", type=positive_int, default=2, help="the caller's torch threads (default: %(default)s)")
    ap.add_argument("--epochs", type=positive_int, default=10, help="epochs of the full-data run (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=None, help="Fashion-MNIST folder")
    ap.add_argument("--limit-train", type=positive_int, default=None)
    ap.add_argument("--limit-test", type=positive_int, default=None)
    ns = ap.parse_args(argv)

    from crestcore.apps.train_demo import TrainSettings, _import_torch, breakdown_line, load_data, train_method

    _import_torch()
    from crestcore.adapters import torch as ta

    _warm_up(["crest"], crest_host=False)
    data = load_data(ns.root, n_train=ns.limit_train, n_test=ns.limit_test, seed=ns.seed)
    settings = TrainSettings(epochs=ns.epochs, seed=ns.seed, threads=ns.threads, device="cpu", evals=1, extra={})
    walls: dict[bool, list[float]] = {True: [], False: []}
    accs: dict[bool, list[float]] = {True: [], False: []}
    for r in range(ns.rounds):
        for one in ((False, True) if r % 2 == 0 else (True, False)):
            ta._ONE_THREAD_BOOKKEEPING = one
            rec = train_method("crest", data, settings, progress=False)
            walls[one].append(rec["wall"])
            accs[one].append(rec["acc"])
            label = "one thread   " if one else "caller's     "
            print(f"round {r} {label} wall {rec['wall']:6.2f} s  acc {100 * rec['acc']:.2f} %  "
                  + breakdown_line("crest", rec), flush=True)
    ta._ONE_THREAD_BOOKKEEPING = True
    for one in (False, True):
        w = walls[one]
        print(f"{'one thread' if one else 'caller threads'}: wall median {statistics.median(w):.2f} s, runs "
              + ", ".join(f"{x:.2f}" for x in w))
    ratios = [a / b for a, b in zip(walls[True], walls[False])]
    print("one thread / caller's, per round: " + ", ".join(f"{x:.3f}" for x in ratios))
    print("same accuracy every run: " + str(len(set(accs[True] + accs[False])) == 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
