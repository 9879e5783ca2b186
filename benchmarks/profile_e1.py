"""Where one E1 run's time goes: a method of ``benchmarks/e2e.py`` trained once to warm up, then once under
cProfile, with the functions that took the most time printed (own time and cumulative).

E2 (``benchmarks/e2e.py``) splits CREST's time into the categories of ``OpsTimer`` ("the rest of the
selection step" is one of them); this script names the functions inside them. On a GPU, CUDA kernels run
asynchronously: their time shows up at the next call that waits for them (a ``.item()``, a copy to the
host, a synchronisation), so read the GPU profile by the calls that wait, not by the kernels.

    python benchmarks/profile_e1.py --method crest --device cuda --root DIR --out prof.txt
    python benchmarks/profile_e1.py --method glister --baseline-solve-on host --device cuda --root DIR
    python benchmarks/profile_e1.py --method crest --limit-train 6000 --limit-test 1000   # a smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import _warm_up, positive_int, settings_extra, torch_device  # noqa: E402

from crestcore.baselines import SOLVE_ON  # noqa: E402
from crestcore.controller import CONFIG_BACKENDS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="crest", help="one method of crest demo's list (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs of the full-data run (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--device", type=torch_device, default=None, help="torch device (default: cpu)")
    p.add_argument("--crest-backend", default="auto", choices=CONFIG_BACKENDS)
    p.add_argument("--baseline-solve-on", default="auto", choices=SOLVE_ON)
    p.add_argument("--root", default=None, help="Fashion-MNIST folder")
    p.add_argument("--limit-train", type=positive_int, default=None)
    p.add_argument("--limit-test", type=positive_int, default=None)
    p.add_argument("--top", type=positive_int, default=30, help="rows of each listing (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write the listing here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    ns = parse_args(argv)
    from crestcore.apps.train_demo import (
        TrainSettings, _import_torch, breakdown_line, crest_runs_numba, load_data, parse_methods, selects,
        train_method,
    )

    try:
        (method,) = parse_methods(ns.method)
    except ValueError as exc:
        print(f"--method: {exc} (one method)", file=sys.stderr)
        return 2
    _import_torch()
    device = ns.device or "cpu"
    warm = _warm_up([method], crest_host=crest_runs_numba(ns.crest_backend, str(device).startswith("cpu")))
    data = load_data(ns.root, n_train=ns.limit_train, n_test=ns.limit_test, seed=ns.seed)
    s = TrainSettings(epochs=ns.epochs, seed=ns.seed, threads=ns.threads, device=device, evals=1,
                      extra=settings_extra(ns))
    t = time.perf_counter()
    first = train_method(method, data, s, progress=False)
    t_first = time.perf_counter() - t
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    rec = train_method(method, data, s, progress=False)
    prof.disable()
    t_prof = time.perf_counter() - t
    buf = io.StringIO()
    buf.write(f"# profile of E1's {method} on {device} (seed {ns.seed}, {ns.epochs} epochs, crest backend "
              f"{ns.crest_backend}, baselines solve_on {ns.baseline_solve_on})\n")
    buf.write(f"kernel warm-up {warm:.1f} s; first run (unprofiled) wall {first['wall']:.2f} s ({t_first:.1f} s "
              f"with its evaluations); profiled run wall {rec['wall']:.2f} s ({t_prof:.1f} s), "
              f"acc {100 * rec['acc']:.2f} / {100 * first['acc']:.2f} %\n")
    if selects(method):
        buf.write("first run:    " + breakdown_line(method, first) + "\n")
        buf.write("profiled run: " + breakdown_line(method, rec) + "\n")
    for key, what in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buf.write(f"\n## the {ns.top} functions with the most {what}\n")
        st = pstats.Stats(prof, stream=buf)
        st.strip_dirs().sort_stats(key).print_stats(ns.top)
    text = buf.getvalue()
    print(text)
    if ns.out:
        Path(ns.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
