"""The ``crest`` command line: ``crest demo``, ``crest info``, ``crest bench``.

The CLI sits on top of everything and the core never imports it. Heavy or optional modules (the demo,
the backends, torch, numba, tqdm, matplotlib) are imported inside the command that needs them, so
``crest --help`` and ``crest info`` stay quick.

Exit codes: 0 success; 2 usage error (argparse); 1 a clear one-line error (missing data set, malformed
file, bad value) without a traceback; 130 interrupted; ``crest bench`` passes on the benchmark's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

PROG = "crest"


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _source_benchmarks() -> Path:
    """``benchmarks/`` of the source checkout this package runs from (it is not installed)."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


def build_parser() -> argparse.ArgumentParser:
    # Choices come from the core's constants (cheap: the core imports only numpy/array-api-compat).
    from .facility import OPTIMIZERS
    from .similarity import KERNELS, METRICS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="CREST mini-batch coresets: facility-location selection demo, environment info, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,info,bench}")

    demo = sub.add_parser(
        "demo",
        help="select a weighted per-class coreset of Fashion-MNIST and compare it with random picks",
        description=(
            "Select a weighted facility-location coreset of each Fashion-MNIST class (pixel features), "
            "compare its objective with a random subset of the same size, print a table and save figures."
        ),
    )
    demo.add_argument("--out", default="./crest-demo-out", metavar="DIR",
                      help="output folder for the figures and results.json (default: %(default)s)")
    demo.add_argument("--fraction", type=_fraction, default=0.01,
                      help="share of each class to select, in (0, 1] (default: %(default)s = 60 per class)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: %(default)s)")
    demo.add_argument("--metric", choices=METRICS, default="euclidean", help="distance (default: %(default)s)")
    demo.add_argument("--kernel", choices=KERNELS, default="max-minus",
                      help="similarity kernel (default: %(default)s)")
    demo.add_argument("--optimizer", choices=OPTIMIZERS, default="lazy",
                      help="greedy variant (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--root", default=None, metavar="DIR",
                      help="folder with the gzipped Fashion-MNIST IDX files "
                           "(default: /usr/share/datasets/fashion-mnist)")
    demo.add_argument("--limit-per-class", type=_positive_int, default=None, metavar="N",
                      help="use at most N randomly chosen images per class (quick runs)")
    demo.add_argument("--top", type=_positive_int, default=12, metavar="N",
                      help="images per class in the figures (default: %(default)s)")

    info = sub.add_parser("info", help="version, importable backends, data set presence",
                          description="Print the version, which backends import here, and whether "
                                      "Fashion-MNIST is present.")
    info.add_argument("--root", default=None, metavar="DIR", help="Fashion-MNIST folder to check")

    # `crest bench NAME [ARGS...]`: the benchmarks live in the source tree (benchmarks/NAME.py) and
    # are not installed with the package; from a checkout `make bench` runs them all.
    bench = sub.add_parser(
        "bench",
        help="run a benchmark from the source checkout (e.g. `crest bench selection`)",
        description="Run benchmarks/NAME.py from the source checkout, passing the remaining arguments on.",
    )
    bench.add_argument("name", help="benchmark name, e.g. 'selection' for benchmarks/selection.py")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def _cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_selection_demo

    run_selection_demo(
        ns.out,
        fraction=ns.fraction,
        seed=ns.seed,
        metric=ns.metric,
        kernel=ns.kernel,
        optimizer=ns.optimizer,
        progress=not ns.no_progress,
        root=ns.root,
        limit_per_class=ns.limit_per_class,
        top=ns.top,
    )
    return 0


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _gpu_line() -> str | None:
    """Whether a CUDA device is usable (asked through torch when it imports; an import alone proves
    nothing: CuPy imports without a GPU)."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    except Exception as exc:  # a broken driver must not break `crest info`
        return f"GPU: none usable ({type(exc).__name__}: {exc})"
    return "GPU: none (torch.cuda.is_available() is False)"


def _cmd_info(ns: argparse.Namespace) -> int:
    import platform

    import numpy as np

    from . import __version__
    from .backends import available_backends
    from .datasets import DEFAULT_FASHION_MNIST_ROOT, fashion_mnist_available

    print(f"crestcore {__version__}  (Python {platform.python_version()}, NumPy {np.__version__})")
    print("backends (native kernels; the generic array-API reference is always available):")
    for name, state in available_backends().items():
        print(f"  {name:<6} {'ok' if state == 'ok' else 'unavailable: ' + state.splitlines()[0]}")
    gpu = _gpu_line()
    if gpu:
        print(gpu)
    extras = ", ".join(f"{d} {_dist_version(d) or 'missing'}" for d in ("tqdm", "matplotlib"))
    print(f"demo extras: {extras}")
    root = ns.root if ns.root is not None else DEFAULT_FASHION_MNIST_ROOT
    ok = {s: fashion_mnist_available(root, s) for s in ("train", "test")}
    state = ", ".join(f"{s} {'present' if v else 'missing'}" for s, v in ok.items())
    print(f"Fashion-MNIST in {root}: {state}")
    if not all(ok.values()):
        print("  install with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu)")
    bdir = _source_benchmarks()
    if bdir.is_dir():
        names = sorted(p.stem for p in bdir.glob("*.py") if not p.name.startswith("_"))
        print(f"benchmarks ({bdir}): {', '.join(names) if names else 'none yet'}")
    else:
        print("benchmarks: not available (they run from a source checkout with `make bench`)")
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    import subprocess

    bdir = _source_benchmarks()
    script = bdir / f"{ns.name}.py"
    if not script.is_file():
        if bdir.is_dir():
            names = sorted(p.stem for p in bdir.glob("*.py") if not p.name.startswith("_"))
            known = f"available here: {', '.join(names)}" if names else "none written yet"
            _err(f"no benchmark {ns.name!r}: {script} does not exist ({known}); "
                 "benchmarks run from a source checkout with `make bench`")
        else:
            _err(
                "benchmarks are not installed with the package; they run from a source checkout "
                "of crestcore with `make bench` (or `crest bench NAME` there)"
            )
        return 1
    args = list(ns.args)
    if args[:1] == ["--"]:
        args = args[1:]
    # the caller's working directory is kept, so relative paths in args mean what the user meant
    return subprocess.call([sys.executable, str(script), *args])


def main(argv=None) -> int:
    """Run the ``crest`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return 2
    commands = {"demo": _cmd_demo, "info": _cmd_info, "bench": _cmd_bench}
    try:
        return commands[ns.command](ns)
    except FileNotFoundError as exc:
        _err(str(exc))
        return 1
    except ValueError as exc:  # bad values reaching the library, malformed data files
        _err(str(exc))
        return 1
    except ImportError as exc:  # e.g. matplotlib missing for the demo figures
        _err(f"{exc}; install the demo extras with `pip install 'crestcore[demo]'`")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
