"""Watching a CREST run outside Lightning: a small listener protocol, TensorBoard and W&B writers.

A listener is any callable ``listener(event, step, scalars)``: ``event`` is ``"selection"`` (a selection
started: new random subsets and a model fit; the just-in-time coresets of the steps after it are no events),
``"check"`` (a trust check ran), ``"drop"`` (a drop decision was made; it may have removed
no example) or ``"epoch"`` (an epoch's share was handed out); ``step`` is the run's step counted in batches
handed out, the event's own batch included (one more than the 0-based step ``stats`` records for it);
several events of one batch are several calls, each with all the scalars;
``scalars`` is :func:`scalars` of the loader's ``stats`` (plain floats named ``crest/...``). Pass
listeners to :class:`crestcore.adapters.torch.CrestLoader` or ``CrestBatchSampler`` as
``callbacks=[...]``::

    from torch.utils.tensorboard import SummaryWriter
    from crestcore.adapters.monitor import TensorBoardWriter

    loader = CrestLoader(model, train_set, budget=0.1, epochs=200, callbacks=[TensorBoardWriter(SummaryWriter())])

The Lightning callback logs the same scalars through ``pl_module.log_dict``. Nothing here imports
TensorBoard or W&B until a writer is built.
"""

from __future__ import annotations

import math
import os
from typing import Any
from collections.abc import Callable

__all__ = ["EVENTS", "scalars", "TensorBoardWriter", "WandbWriter", "check_listeners"]

EVENTS = ("selection", "check", "drop", "epoch")


def scalars(stats: dict) -> dict[str, float]:
    """The numbers worth plotting from a loader's ``stats``: selections and checks so far, the last rho,
    T1, P, the pool size, drop decisions (each may have removed no example: the pool size tells the examples
    left), and both budget fractions (training steps; all passes).

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from crestcore import CrestConfig
    >>> from crestcore.adapters.torch import CrestLoader
    >>> data = TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)),
    ...                      torch.arange(64) % 2)
    >>> loader = CrestLoader(torch.nn.Linear(4, 2), data, config=CrestConfig(m=8), budget=0.5)
    >>> batch = next(iter(loader))
    >>> values = scalars(loader.stats)
    >>> sorted(values)
    ['crest/P', 'crest/T1', 'crest/checks', 'crest/drops', 'crest/fraction_all_passes',
     'crest/fraction_steps', 'crest/pool', 'crest/selections']
    >>> values["crest/selections"], values["crest/pool"], values["crest/fraction_steps"]
    (1.0, 64.0, 0.125)
    """
    out = {
        "crest/selections": float(len(stats["selections"])),
        "crest/checks": float(len(stats["checks"])),
        "crest/drops": float(len(stats.get("drops", []))),
        "crest/T1": float(stats["T1"]),
        "crest/P": float(stats["P"]),
        "crest/pool": float(stats["pool"]),
        "crest/fraction_steps": float(stats["budget"]["fraction_steps"]),
        "crest/fraction_all_passes": float(stats["budget"]["fraction_all_passes"]),
    }
    if stats["rho"]:
        out["crest/rho"] = float(stats["rho"][-1])
    return out


def check_listeners(callbacks, name: str = "callbacks") -> list[Callable]:
    """``callbacks`` as a list of callables (None: empty); a clear error naming ``name`` otherwise.

    Examples
    --------
    >>> def show(event, step, values):
    ...     print(event, step)
    >>> check_listeners(None), check_listeners(show) == [show]
    ([], True)
    >>> check_listeners(["selection"])
    Traceback (most recent call last):
        ...
    TypeError: callbacks must hold callables listener(event, step, scalars), got str
    """
    if callbacks is None:
        return []
    if callable(callbacks):
        callbacks = [callbacks]
    try:
        out = list(callbacks)
    except TypeError as exc:
        raise TypeError(f"{name} must be a list of callables listener(event, step, scalars), got "
                        f"{type(callbacks).__name__}") from exc
    for c in out:
        if not callable(c):
            raise TypeError(f"{name} must hold callables listener(event, step, scalars), got {type(c).__name__}")
    return out


def _check_events(events) -> tuple[str, ...]:
    if isinstance(events, str):  # one event by name, not its letters
        events = (events,)
    try:
        events = tuple(events)
    except TypeError:
        raise TypeError(f"events must be an event name or an iterable of them (among {EVENTS}), got "
                        f"{events!r}") from None
    bad = [e for e in events if not isinstance(e, str) or e not in EVENTS]
    if bad:
        raise ValueError(f"events must be among {EVENTS}, got {bad!r}")
    return tuple(events)


def _isnan(v) -> bool:
    try:
        return math.isnan(v)
    except TypeError:  # not a real number: compared by == only
        return False


class TensorBoardWriter:
    """Writes every event's scalars to TensorBoard: ``writer`` is a ``SummaryWriter`` (torch's or
    tensorboardX's: anything with ``add_scalar(tag, value, step)``), or a log directory for a new
    ``torch.utils.tensorboard.SummaryWriter``. ``events``: which events write (default all).

    Examples
    --------
    Any object with ``add_scalar`` will do; here one that prints what TensorBoard would receive:

    >>> class Printer:
    ...     def add_scalar(self, tag, value, step):
    ...         print(step, tag, value)
    >>> listener = TensorBoardWriter(Printer(), events=("check",))
    >>> listener("check", 12, {"crest/rho": 0.03, "crest/T1": 2.0})
    12 crest/rho 0.03
    12 crest/T1 2.0
    >>> listener("selection", 12, {"crest/selections": 3.0})  # not among events: nothing written
    >>> listener("check", 12, {"crest/rho": 0.03, "crest/T1": 3.0})  # a second event at step 12: what changed
    12 crest/T1 3.0

    Pass it to a loader as ``CrestLoader(..., callbacks=[listener])``.
    """

    def __init__(self, writer: Any = None, *, events=EVENTS):
        events = _check_events(events)  # before a log directory is made: a refused call leaves no event file
        if writer is None or isinstance(writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # torch's writer: torch and tensorboard both (review 108)
                need = "PyTorch's SummaryWriter: pip install 'crestcore[torch,monitor]'" if getattr(
                    exc, "name", None) == "torch" else "TensorBoard: pip install tensorboard"
                raise ImportError(f"TensorBoardWriter needs {need} (or pass a writer with add_scalar)") from exc
            writer = SummaryWriter(log_dir=None if writer is None else os.fspath(writer))
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have add_scalar(tag, value, step), got {type(writer).__name__}")
        self.writer = writer
        self.events = events
        self._written: dict[str, tuple[int, float]] = {}  # tag -> (step, value) written last

    def __call__(self, event: str, step: int, values: dict[str, float]) -> None:
        if event not in self.events:
            return
        for tag, v in values.items():
            last = self._written.get(tag)
            # several events at one step: one point, not duplicates (a NaN, which equals nothing, included)
            if last is not None and last[0] == step and (last[1] == v or (_isnan(last[1]) and _isnan(v))):
                continue
            self.writer.add_scalar(tag, v, step)
            self._written[tag] = (step, v)  # once written: a failed write is tried again at the next event

    def flush(self) -> None:
        """Write the pending events to disk (the writer's ``flush``, where it has one).

        Examples
        --------
        >>> class Writer:
        ...     def add_scalar(self, tag, value, step):
        ...         pass
        ...     def flush(self):
        ...         print("flushed")
        >>> TensorBoardWriter(Writer()).flush()
        flushed
        """
        f = getattr(self.writer, "flush", None)
        if callable(f):
            f()

    def close(self) -> None:
        """Flush and close the writer (one log directory per run: a second run through the same writer
        would draw its ``crest/*`` curves on the first one's charts). A writer without ``close`` is left
        as it is.

        Examples
        --------
        >>> class Writer:
        ...     def add_scalar(self, tag, value, step):
        ...         pass
        ...     def close(self):
        ...         print("closed")
        >>> TensorBoardWriter(Writer()).close()
        closed
        """
        f = getattr(self.writer, "close", None)
        if callable(f):
            f()


class WandbWriter:
    """Logs every event's scalars to Weights & Biases: ``run`` is a ``wandb`` run (default
    ``wandb.run``, the active one). W&B is optional and imported only here.

    The run's own step is left to your training loop: W&B drops a log whose ``step=`` is below the last
    one, and merges logs at the same step, so CREST's events (sent when a batch is handed out, several at
    one step) would drop or overwrite yours and each other. Each event is one row with its CREST step as
    the metric ``crest/step``; the writer declares it the x-axis of every ``crest/*`` chart
    (``run.define_metric``, when the run has it).

    Examples
    --------
    Any object with ``log(dict)`` will do; here one that prints what W&B would receive (the event is
    logged too, as its index in ``EVENTS``):

    >>> class Run:
    ...     def log(self, values):
    ...         print(values)
    >>> listener = WandbWriter(Run())
    >>> listener("epoch", 40, {"crest/fraction_steps": 0.1})
    {'crest/fraction_steps': 0.1, 'crest/event': 3, 'crest/step': 40}
    """

    def __init__(self, run: Any = None, *, events=EVENTS):
        if run is None:
            try:
                import wandb
            except ImportError as exc:  # pragma: no cover - depends on what is installed
                raise ImportError("WandbWriter needs wandb (pip install wandb), or pass run=") from exc
            run = wandb.run
            if run is None:
                raise RuntimeError("WandbWriter: no active W&B run; call wandb.init() first or pass run=")
        if not callable(getattr(run, "log", None)):
            raise TypeError(f"run must have log(dict), got {type(run).__name__}")
        self.run = run
        self.events = _check_events(events)
        define = getattr(run, "define_metric", None)
        if callable(define):  # CREST's charts against CREST's step, whatever the run's own step is
            define("crest/step")
            define("crest/*", step_metric="crest/step")

    def __call__(self, event: str, step: int, values: dict[str, float]) -> None:
        if event in self.events:
            self.run.log({**values, "crest/event": EVENTS.index(event), "crest/step": int(step)})
