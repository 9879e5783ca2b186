"""The ``crest`` command line: ``crest demo`` (``--selection``), ``crest info``, ``crest bench``.

The CLI sits on the applications floor (``crestcore.apps``), on top of everything: nothing below imports
it. Heavy or optional modules (the demo, the backends, torch, numba, keras, tqdm, matplotlib) are imported
inside the command that needs them, so ``crest --help`` and ``crest info`` stay quick.

Exit codes: 0 success; 2 usage error (argparse, or a value refused before anything runs: a device torch
cannot use, a seed out of range); 1 a clear one-line error (missing data set, malformed file) without a
traceback; 130 interrupted; ``crest bench`` passes on the benchmark's own.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from crestcore.apps import MissingExtra

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


def int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse names the flag in its error).

    >>> int_at_least(1)("3")
    3
    """
    words = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be {words}, got {v}")
        return v

    return parse


_positive_int = int_at_least(1)


def _source_benchmarks() -> Path:
    """``benchmarks/`` of the source checkout this package runs from: it sits next to ``apps/`` (this
    file's folder). A wheel installs no benchmarks, so there the folder does not exist."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


def _no_checkout_message(bdir: Path) -> str:
    return (f"`crest bench` needs a source checkout of crestcore: the benchmarks are not installed with the "
            f"package (looked for {bdir}). Run it from a clone of the repository, installed with "
            "`pip install -e '.[bench]'` (the peers it compares with: apricot, submodlib, ...), or run `make bench` "
            "there")


# defaults of the training demo, shown in --help (kept in step with crestcore.apps.train_demo.TrainSettings
# by tests/test_train_demo.py; the CLI must not import torch to show them)
_TRAIN_DEFAULTS = {"epochs": 5, "budget": 0.1, "evals": 6}

_SELECTION_OPTS = ("fraction", "metric", "kernel", "optimizer", "limit_per_class", "top")
_TRAINING_OPTS = ("epochs", "budget", "device", "threads", "methods", "limit_train", "limit_test", "evals",
                  "framework", "keras_backend")


def build_parser() -> argparse.ArgumentParser:
    """The ``crest`` argument parser: ``demo`` (the training demo; ``--selection``: the selection demo),
    ``info`` and ``bench``. Options left out are ``None``: the demo's own defaults apply.

    Examples
    --------
    >>> parser = build_parser()
    >>> ns = parser.parse_args(["demo", "--epochs", "3", "--budget", "0.2", "--methods", "random,crest"])
    >>> ns.command, ns.epochs, ns.budget, ns.methods, ns.framework
    ('demo', 3, 0.2, 'random,crest', None)
    >>> ns = parser.parse_args(["demo", "--selection", "--fraction", "0.05", "--limit-per-class", "100"])
    >>> ns.selection, ns.fraction, ns.limit_per_class, ns.metric
    (True, 0.05, 100, None)
    >>> parser.parse_args(["bench", "selection", "--quick"]).args
    ['--quick']
    """
    # Choices come from the core's constants (cheap: the core imports only numpy/array-api-compat).
    from crestcore.facility import OPTIMIZERS
    from crestcore.similarity import KERNELS, METRICS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="CREST mini-batch coresets: training demo (full data vs random vs CREST), selection "
                    "demo, environment info, benchmarks (e.g. `crest bench e2e`).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,info,bench}")

    demo = sub.add_parser(
        "demo",
        help="train a CNN on Fashion-MNIST with full data, random subsets and CREST (--selection: the "
             "selection demo)",
        description=(
            "Train a small CNN on Fashion-MNIST on full data, on random subsets and with CREST at a "
            "budget of the full run's steps (with learned-example dropping off and on); print a table of "
            "test accuracy, relative error and wall clock, and save figures and results.json. "
            "By default it runs full data, a random subset re-drawn each epoch, CREST and CREST with dropping; "
            "--methods all adds SGD for the budget's steps, CRAIG, GradMatch, GLISTER and loss-based pruning. "
            "With --selection (or any selection option), run the selection demo instead: a weighted "
            "facility-location coreset of each class against random picks."
        ),
    )
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="output folder for the figures and results.json (default: ./crest-demo-out, "
                           "./crest-selection-demo-out with --selection)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--root", default=None, metavar="DIR",
                      help="folder with the gzipped Fashion-MNIST IDX files "
                           "(default: /usr/share/datasets/fashion-mnist)")
    train = demo.add_argument_group("training comparison (the default)")
    train.add_argument("--epochs", type=_positive_int, default=None,
                       help=f"epochs of the full-data run; budgeted runs get --budget of its steps "
                            f"(default: {_TRAIN_DEFAULTS['epochs']})")
    train.add_argument("--budget", type=_fraction, default=None,
                       help=f"share of the full run's training steps for random and CREST, in (0, 1] "
                            f"(default: {_TRAIN_DEFAULTS['budget']})")
    train.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    train.add_argument("--framework", choices=("torch", "keras"), default=None,
                       help="train through PyTorch (default) or Keras 3 (crestcore.adapters.keras)")
    train.add_argument("--keras-backend", choices=("torch", "jax"), default=None,
                       help="Keras backend with --framework keras (default: torch)")
    train.add_argument("--threads", type=_positive_int, default=None,
                       help="torch CPU threads (default: 2)")
    train.add_argument("--methods", default=None, metavar="LIST",
                       help="comma-separated methods of full,sgd-budget,random,craig,gradmatch,glister,prune,"
                            "crest,crest-drop, or 'all' (default: full,random,crest,crest-drop; 'all' adds every baseline "
                            "and takes several minutes more; full always runs: the relative error and the forgetting "
                            "scores need it)")
    train.add_argument("--limit-train", type=_positive_int, default=None, metavar="N",
                       help="use N random training images (quick runs)")
    train.add_argument("--limit-test", type=_positive_int, default=None, metavar="N",
                       help="use N random test images (quick runs)")
    train.add_argument("--evals", type=_positive_int, default=None,
                       help=f"test evaluations per run (default: {_TRAIN_DEFAULTS['evals']})")
    sel = demo.add_argument_group("selection demo (--selection; any of these options implies it)")
    sel.add_argument("--selection", action="store_true",
                     help="run the facility-location selection demo instead of the training comparison")
    sel.add_argument("--fraction", type=_fraction, default=None,
                     help="share of each class to select, in (0, 1] (default: 0.01 = 60 per class)")
    sel.add_argument("--metric", choices=METRICS, default=None, help="distance (default: euclidean)")
    sel.add_argument("--kernel", choices=KERNELS, default=None, help="similarity kernel (default: max-minus)")
    sel.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="greedy variant (default: lazy)")
    sel.add_argument("--limit-per-class", type=_positive_int, default=None, metavar="N",
                     help="use at most N randomly chosen images per class (quick runs)")
    sel.add_argument("--top", type=_positive_int, default=None, metavar="N",
                     help="images per class in the figures (default: 12)")

    info = sub.add_parser("info", help="version, importable backends, data set presence",
                          description="Print the version, which backends import here, and whether "
                                      "Fashion-MNIST is present.")
    info.add_argument("--root", default=None, metavar="DIR", help="Fashion-MNIST folder to check")

    # `crest bench NAME [ARGS...]`: the benchmarks live in the source tree (benchmarks/NAME.py) and
    # are not installed with the package; from a checkout `make bench` runs them all.
    bench = sub.add_parser(
        "bench",
        help="run a benchmark from the source checkout (e.g. `crest bench selection`, `crest bench e2e`)",
        description="Run benchmarks/NAME.py from the source checkout, passing the remaining arguments on.",
    )
    bench.add_argument("name", nargs="?", help="benchmark name, e.g. 'selection' for benchmarks/selection.py")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning during a command, as the command line's own line: its category and message, without the
    Python source line it was attributed to (a library warning's stack level points at this module)."""
    print(f"{PROG}: warning: {category.__name__}: {message}", file=sys.stderr if file is None else file)


def _cmd_demo(ns: argparse.Namespace) -> int:
    selection = ns.selection or any(getattr(ns, k) is not None for k in _SELECTION_OPTS)
    if ns.out is not None and os.path.exists(ns.out) and not os.path.isdir(ns.out):
        _err(f"--out {ns.out} is a file; the demo writes its figures and results.json into a folder")
        return 2
    if selection:
        wrong = [k for k in _TRAINING_OPTS if getattr(ns, k) is not None]
        if wrong:
            _err(f"--{wrong[0].replace('_', '-')} belongs to the training demo; the selection demo "
                 "(--selection or a selection option) does not take it")
            return 2
        return _cmd_selection_demo(ns)
    return _cmd_training_demo(ns)


def _cmd_selection_demo(ns: argparse.Namespace) -> int:
    from .demo import run_selection_demo

    if ns.seed < 0:
        _err(f"--seed must be a non-negative integer, got {ns.seed}")
        return 2
    run_selection_demo(
        ns.out if ns.out is not None else "./crest-selection-demo-out",
        fraction=ns.fraction if ns.fraction is not None else 0.01,
        seed=ns.seed,
        metric=ns.metric or "euclidean",
        kernel=ns.kernel or "max-minus",
        optimizer=ns.optimizer or "lazy",
        progress=not ns.no_progress,
        root=ns.root,
        limit_per_class=ns.limit_per_class,
        top=ns.top if ns.top is not None else 12,
    )
    return 0


def _cmd_training_demo(ns: argparse.Namespace) -> int:
    from .train_demo import DEFAULT_METHODS, TrainSettings, parse_methods, run_training_demo

    s = TrainSettings(seed=ns.seed)
    for k in ("epochs", "budget", "device", "threads", "evals"):
        if getattr(ns, k) is not None:
            setattr(s, k, getattr(ns, k))
    if not 0 <= ns.seed < 2**63:  # torch's seed is a signed 64-bit integer
        _err(f"--seed must be an integer in [0, 2**63), got {ns.seed}")
        return 2
    if ns.keras_backend is not None and ns.framework != "keras":
        _err("--keras-backend needs --framework keras")
        return 2
    if ns.limit_train is not None and ns.limit_train < s.m:  # (it failed after the full run, naming m: review 135)
        _err(f"--limit-train must be at least {s.m}, the demo's mini-batch size (got {ns.limit_train})")
        return 2
    # the Keras demo runs on --keras-backend, torch when not given (KERAS_BACKEND is not read: it ran on torch
    # while the --threads check below took KERAS_BACKEND=jax for a jax run, review 135)
    if ns.threads is not None and ns.framework == "keras" and (ns.keras_backend or "torch") == "jax":
        _err("--threads sets torch's CPU threads, which the jax backend does not use (it would be ignored); set "
             "XLA_FLAGS for XLA's threads instead")
        return 2
    if s.device is not None:
        if ns.framework == "keras" and (ns.keras_backend or "torch") == "jax":
            if s.device != "cpu":  # the demo sets JAX_PLATFORMS=cpu: a JAX run from here is a CPU run
                _err(f"--device {s.device!r} with --keras-backend jax: the Keras demo runs JAX on the CPU only "
                     "(it sets JAX_PLATFORMS=cpu); --device takes only cpu there")
                return 2
        else:  # the torch demo, or Keras on torch (KERAS_TORCH_DEVICE)
            from .train_demo import torch_device_problem

            try:
                problem = torch_device_problem(s.device)
            except ImportError:
                problem = None  # said below, by the demo's own import, naming the extra
            if problem is not None:
                _err(f"--device: {problem}")
                return 2
    methods = DEFAULT_METHODS
    if ns.methods is not None:
        try:
            methods = parse_methods(ns.methods)
        except ValueError as exc:
            _err(f"--methods: {exc}")
            return 2
    if ns.framework == "keras":
        from .keras_demo import DEFAULT_METHODS as KERAS_DEFAULT, run_keras_comparison  # imports no keras

        backend = ns.keras_backend or "torch"
        _choose_keras_backend(backend, s.device)
        try:
            run_keras_comparison(
                ns.out if ns.out is not None else "./crest-keras-demo-out", settings=s,
                methods=methods if ns.methods is not None else KERAS_DEFAULT,
                backend=backend, progress=not ns.no_progress, root=ns.root,
                n_train=ns.limit_train, n_test=ns.limit_test,
            )
        except MissingExtra as exc:  # says what to install
            _err(str(exc))
            return 1
        except ImportError as exc:
            extra = "keras-jax,demo" if backend == "jax" else "keras,torch,demo"
            _err(f"{exc}; the Keras demo on its {backend} backend needs Keras 3 and {backend}: pip install "
                 f"'crestcore[{extra}]'")
            return 1
        return 0
    try:
        run_training_demo(
            ns.out if ns.out is not None else "./crest-demo-out",
            settings=s, methods=methods, progress=not ns.no_progress, root=ns.root,
            n_train=ns.limit_train, n_test=ns.limit_test,
        )
    except MissingExtra as exc:  # says what to install
        _err(str(exc))
        return 1
    except ImportError as exc:
        if getattr(exc, "name", None) == "torch" or "torch" in str(exc):
            _err(f"{exc}; the training demo needs PyTorch: pip install 'crestcore[torch,demo]'")
            return 1
        raise
    return 0


def _choose_keras_backend(backend: str, device: str | None) -> None:
    """Put the Keras backend and device in the environment, before keras is first imported.

    Keras reads ``KERAS_BACKEND`` (and ``KERAS_TORCH_DEVICE`` / ``JAX_PLATFORMS``) once, at its first import,
    and cannot switch afterwards. So the choice is made here, in the command-line entry point and only
    here: the library modules (``crestcore.apps.keras_demo`` included) never write ``os.environ``. A keras
    imported earlier in this process keeps its backend, and the demo refuses a mismatch."""
    import os

    if "keras" in sys.modules:
        return
    from .keras_demo import keras_environment

    os.environ.update(keras_environment(backend, device))
    if backend == "torch" and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_demo._import_torch


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

    from crestcore import __version__
    from crestcore.backends import available_backends
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
        print("benchmarks: not installed (`crest bench` and `make bench` run from a source checkout)")
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    import subprocess

    bdir = _source_benchmarks()
    # a benchmark's name, not a path: "crest bench ../x" ran any Python file (refused with or without a checkout)
    if ns.name is not None and not ns.name.isidentifier() and not bdir.is_dir():
        _err(f"no benchmark {ns.name!r} (a benchmark's name, not a path); " + _no_checkout_message(bdir))
        return 1
    script = bdir / f"{ns.name}.py"
    if ns.name is None or not ns.name.isidentifier() or not script.is_file():
        if bdir.is_dir():
            names = sorted(p.stem for p in bdir.glob("*.py") if not p.name.startswith("_"))
            known = f"available here: {', '.join(names)}" if names else "none written yet"
            _err((f"no benchmark {ns.name!r}" + (f": {script} does not exist" if ns.name.isidentifier() else
                                                 " (a benchmark's name, not a path)") if ns.name is not None else
                  "name a benchmark: crest bench NAME [ARGS...]") + f" ({known}); "
                 "benchmarks run from a source checkout with `make bench`")
        else:
            _err(_no_checkout_message(bdir))
        return 1
    args = list(ns.args)
    if args[:1] == ["--"]:
        args = args[1:]
    # the caller's working directory is kept, so relative paths in args mean what the user meant
    return subprocess.call([sys.executable, str(script), *args])


def main(argv=None) -> int:
    """Run the ``crest`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Examples
    --------
    ``crest info`` reports the versions, the backends that import and whether the data set is present:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...     code = main(["info", "--root", empty])
    crestcore ...
    backends (native kernels; the generic array-API reference is always available):
    ...
    Fashion-MNIST in ...: train missing, test missing
    ...
    >>> code
    0

    A usage error (here a budget above 1) is reported on stderr with exit code 2:

    >>> main(["demo", "--budget", "2"])
    2
    """
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
        with warnings.catch_warnings():  # (the filters as they are; only the display changes, restored after)
            warnings.showwarning = _show_warning
            return commands[ns.command](ns)
    except OSError as exc:  # a missing data folder, an --out that is a file, no permission to write
        _err(str(exc))
        return 1
    except ValueError as exc:  # bad values reaching the library, malformed data files
        _err(str(exc))
        return 1
    except MissingExtra as exc:  # checked before any work; the message says what to install
        _err(str(exc))
        return 1
    except ImportError as exc:  # e.g. matplotlib missing for the demo figures
        # the selection demo needs matplotlib only; the training demos torch (or keras) too (review 90)
        need = "`pip install matplotlib`" if getattr(ns, "selection", False) else "`pip install 'crestcore[demo]'`"
        _err(f"{exc}; install what the demo needs with {need}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
