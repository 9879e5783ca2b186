"""The training-step plan of a budgeted run, framework-free: written once, used by every loader.

:class:`BudgetedPasses` holds the pass accounting every loader shares (epochs, ``len``, ``set_epoch``,
the ``"passes"`` budget and the budget report). A run over ``n`` examples in mini-batches of ``m`` has
``full_steps(n, m) = ceil(n / m)`` steps per full-data epoch; a budget (a positive fraction of those)
gives ``budget_steps(budget, full)`` steps per budgeted epoch, rounded half up and never fewer than one.
:func:`hamilton` splits a budget over classes in proportion to their sizes (the leftover units to the
largest remainders, a fixed rule); :func:`apportion` rounds the same shares at random, so that every
class's expected share is its proportional one (CREST's subsets and coresets use it).
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
import numbers
import warnings
from collections.abc import Iterator, Mapping

import numpy as np

from ._validation import apportion, hamilton, user_stacklevel

__all__ = ["full_steps", "budget_steps", "planned_steps", "hamilton", "apportion", "examples_spent",
           "budget_report", "BudgetedPasses"]


def full_steps(n: int, m: int) -> int:
    """Steps of one full-data epoch: ``ceil(n / m)``.

    >>> full_steps(60000, 128)
    469
    """
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return -(-int(n) // int(m))


def planned_steps(budget: float, full: int) -> int:
    """:func:`budget_steps` for a loader's plan, with a warning when its floor of one step (or the rounding)
    makes an epoch's share more than 1.5 times the budget asked for (on data of a few batches: a budget
    of 0.1 of 3 steps is one step, a third of the data, and with CREST's measurement passes more forward
    passes than training on everything).

    >>> planned_steps(0.1, 469)
    47
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     planned_steps(0.1, 3), len(w)
    (1, 1)
    """
    steps = budget_steps(budget, full)
    if steps > 1.5 * float(budget) * full:
        warnings.warn(
            f"a budget of {float(budget):g} of the {full} full-data steps an epoch rounds to {steps} step"
            f"{'s' if steps > 1 else ''} an epoch ({steps / full:.0%} of the data, against the "
            f"{float(budget):.0%} asked for): a budgeted epoch takes at least one whole mini-batch. On data this "
            "small, a smaller m, or training on all of it, fits the budget better",
            stacklevel=user_stacklevel())
    return steps


def _decimal_budget(budget) -> Fraction:
    """The budget as the number it was written as, exactly: an integer, a rational (``Fraction``) or a
    ``Decimal`` as it is; a float by its shortest decimal in its own precision (``0.009``, also for
    ``np.float32(0.009)``, which is 0.008999999612569809 widened to a Python float). ValueError unless
    positive and finite."""
    bad = ValueError(f"budget must be a positive finite fraction of the full-data steps, got {budget!r}")
    if isinstance(budget, bool) or isinstance(budget, np.bool_):
        raise bad
    if isinstance(budget, numbers.Integral):
        x = Fraction(int(budget))
    elif isinstance(budget, numbers.Rational):  # Fraction, or another exact rational type (gmpy's mpq)
        x = Fraction(int(budget.numerator), int(budget.denominator))
    elif isinstance(budget, Decimal):
        if not budget.is_finite():
            raise bad
        x = Fraction(budget)
    elif isinstance(budget, numbers.Real):
        f = float(budget)
        if not math.isfinite(f):
            raise bad
        # NumPy's str is the shortest decimal that reads back as the same value in the value's own precision
        x = Fraction(str(budget) if isinstance(budget, np.floating) else repr(f))
    else:
        raise bad
    if x <= 0:
        raise bad
    return x


def budget_steps(budget: float, full: int) -> int:
    """Steps of one budgeted epoch: ``budget * full`` rounded half up, at least 1.

    ``budget`` is a positive fraction of the full-data steps (above 1: more steps than a full epoch);
    ``full`` the full-data epoch's steps (:func:`full_steps`). The product is exact, with the budget read
    as the number it was written as: a ``Fraction``, ``Decimal`` or integer as it is, a float (Python's or
    NumPy's, any width) by its shortest decimal in its own precision, so ``0.009`` means 9/1000 even though
    its binary value is a little lower.

    >>> budget_steps(0.1, 469)
    47
    >>> budget_steps(0.001, 10)
    1
    >>> budget_steps(0.009, 1500)  # 13.5 rounds up, though 0.009 * 1500 is 13.499999999999998 in binary
    14
    >>> budget_steps(0.4999, 1_000_001)  # 499900.4999 rounds down at any size
    499900
    >>> from fractions import Fraction
    >>> budget_steps(Fraction(1, 6), 9)  # exactly 3/2
    2
    """
    x = _decimal_budget(budget)
    if isinstance(full, (bool, np.bool_)) or not isinstance(full, numbers.Integral) or full < 1:
        raise ValueError(f"full must be a positive integer (steps of a full-data epoch), got {full!r}")
    # half up as the budget means it (a relative slack did the same for 0.009 but rounded 0.4999 * 1000001 =
    # 499900.4999 up; a float's binary value rounded 13.5 down)
    return max(1, int(math.floor(x * int(full) + Fraction(1, 2))))


def examples_spent(counters: dict) -> tuple[float, float]:
    """(training, measurement) examples spent so far, from a run's ``counters`` (the controller's, or a
    baseline schedule's): the measurement passes in examples of forward+backward,
    ``(forward + 2 * backward) / 3`` (a backward costs about two forwards).

    >>> examples_spent({"train_examples": 1280, "forward_examples": 600, "backward_examples": 150})
    (1280.0, 300.0)
    """
    if not isinstance(counters, Mapping):
        raise TypeError(f"counters must be a run's counters dict, got {type(counters).__name__}")
    missing = [k for k in ("train_examples", "forward_examples", "backward_examples") if k not in counters]
    if missing:
        raise ValueError(f"counters lacks {missing} (a run's counters: trained, forward and backward examples)")
    c = counters
    return float(c["train_examples"]), (c["forward_examples"] + 2.0 * c["backward_examples"]) / 3.0


def budget_report(*, budget: float, counts: str, m: int, full_data_steps: int, planned_steps: int,
                  steps_done: int, counters: dict, **extra) -> dict:
    """The budget report every loader and callback puts in its ``stats["budget"]``: the run's steps
    against the full-data run's, and all its passes (training plus measurement, in step-equivalents of
    ``m`` examples, :func:`examples_spent`) against the same. ``extra`` items are added as they are.

    >>> r = budget_report(budget=0.1, counts="steps", m=128, full_data_steps=940, planned_steps=94,
    ...                   steps_done=94, counters={"train_examples": 94 * 128, "forward_examples": 3840,
    ...                                            "backward_examples": 0})
    >>> r["fraction_steps"], r["overhead_step_equivalents"], round(r["fraction_all_passes"], 4)
    (0.1, 10.0, 0.1106)
    """
    for name, v in (("m", m), ("full_data_steps", full_data_steps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    train, overhead = examples_spent(counters)
    return {
        "budget": budget,
        "counts": counts,
        "full_data_steps": full_data_steps,
        "planned_steps": planned_steps,
        "steps_done": steps_done,
        **extra,
        "overhead_step_equivalents": overhead / m,
        "fraction_steps": steps_done / full_data_steps,
        "fraction_all_passes": (train + overhead) / m / full_data_steps,
    }


#: what a loop that breaks out of its epochs must do, in the warnings about a pass left before its end
_BREAK_ADVICE = (
    "A loop that breaks out of an epoch (for epoch in range(E): for batch in loader: ... break) must call "
    "loader.set_epoch(epoch) at each epoch's start: each pass then yields its epoch's share and the run ends "
    "where planned. Without it every later pass yields the rest of the epoch before, and a loop of `epochs` "
    "passes ends its run short (a scheduler sized from len(loader) * epochs stops before its end).")


class BudgetedPasses:
    """The pass logic of a budgeted run, framework-free, shared by the loaders of the adapters
    (``crestcore.adapters.torch.CrestLoader`` and ``CrestBatchSampler``,
    ``crestcore.adapters.baselines.SubsetLoader``): budget sizing, epochs, ``len``, ``set_epoch``,
    the ``"passes"`` accounting and the budget report. A subclass calls :meth:`_plan_passes` in its
    ``__init__`` and implements ``_step()`` (hand out the next batch: advance ``_position``, return what
    the pass yields) and ``_counters()`` (the run's counters: its examples trained and measured).

    Length semantics (the ``DataLoader`` habit): ``len()`` is the steps of one epoch and each pass over
    the object yields the next epoch's share, so ``len(loader) * epochs`` is the run's planned steps and
    a per-step LR scheduler sized from it ends where its schedule ends. ``per_epoch=False`` (opt-in) makes
    one pass the whole run and ``len()`` the run's steps.

    Examples
    --------
    The smallest subclass, ``_StepNumbers`` at the end of this module, hands out step numbers; with a
    30 % budget over two epochs of 1000 examples in batches of 100:

    >>> loader = _StepNumbers(n=1000, m=100, budget=0.3, epochs=2)
    >>> len(loader), loader.total_steps
    (3, 6)
    >>> for epoch in range(loader.epochs):
    ...     print(epoch, list(loader))
    0 [1, 2, 3]
    1 [4, 5, 6]
    """

    _kind = "loader"
    budget: float  # set by the subclass: the budget it was built with

    def _step(self):
        """Hand out the next batch: advance ``_position``, return what the pass yields."""
        raise NotImplementedError

    def _counters(self) -> dict:
        """The run's counters so far (``train_examples``, ``forward_examples``, ``backward_examples``)."""
        raise NotImplementedError

    def _cost(self) -> tuple[float, float]:
        """(training, measurement) examples spent so far."""
        return examples_spent(self._counters())

    def _plan_passes(self, *, n: int, m: int, budget: float, epochs: int, per_epoch: bool, budget_counts: str,
                     steps_per_epoch: int | None = None) -> None:
        self._pass_m = int(m)
        self.full_steps_per_epoch = full_steps(n, m)
        self.steps_per_epoch = (steps_per_epoch if steps_per_epoch is not None
                                else planned_steps(budget, self.full_steps_per_epoch))
        self.epochs = int(epochs)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.per_epoch = bool(per_epoch)
        self.budget_counts = budget_counts
        self._position = 0  # batches handed out
        self._epochs_done = 0  # passes that ran to the end of their epoch's share
        self._pass_e: int | None = None  # the epoch of the pass running (None: the whole run)
        self._pass_first = 0  # the first epoch whose share the running pass yields (see _pass)
        self._epoch_hint: int | None = None
        self._token = 0  # passes started (each takes the next number when it hands out its first batch)
        self._loads = 0  # states loaded: a pass started before a load ends (said once, _pass_cut_by_load)
        self._warned_cut = False
        self._run_loop = False  # iter_run's passes are running (each followed by the next until the run's end)
        self._warned_done = False
        self._open_handed = 0  # batches the running (or last, if broken off) pass handed out; 0 once it ended
        self._open_epoch: int | None = None  # the epoch of that pass while it is open (a broken-off epoch started)
        self._open_done = False  # whether that pass handed out its share's last batch (a consumer may stop there)
        self._warned_broken = False  # a pass left before its end: said once (_broken_pass)
        self._warned_hint = False  # a set_epoch naming an epoch handed out already was ignored, and said so
        self._drift_said = False  # the epochs' drift was said by whoever calls set_epoch (Lightning's limit)

    def __len__(self) -> int:
        return self.steps_per_epoch if self.per_epoch else self.total_steps

    @property
    def position(self) -> int:
        """Batches handed out so far (over the whole run)."""
        return self._position

    @property
    def epoch(self) -> int:
        """The epoch the next pass yields (0-based; ``epochs`` when the run is done)."""
        return min(max(self._position // self.steps_per_epoch, self._epochs_done), self.epochs)

    def set_epoch(self, epoch: int) -> None:
        """Declare that the next pass is epoch ``epoch`` (0-based): it yields from the current position to
        the end of that epoch's share (so a pass that broke off early is completed, never skipped).
        Optional: without it each pass yields the next epoch's share. An epoch whose share is handed out
        already is ignored, with a warning (the pass yields the run's next epoch).

        Examples
        --------
        A loader handing out step numbers (as in the class example); a pass broken off early is
        completed by the next pass of the same epoch:

        >>> loader = _StepNumbers(n=1000, m=100, budget=0.3, epochs=2)
        >>> for step in loader:
        ...     break
        >>> loader.set_epoch(0)
        >>> list(loader)
        [2, 3]
        >>> loader.set_epoch(1)
        >>> list(loader)
        [4, 5, 6]
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if epoch >= self.epochs:
            raise ValueError(f"epoch {epoch} is beyond the {self.epochs} epochs this {self._kind} was planned for "
                             f"({type(self).__name__}(..., epochs=...))")
        if not self.per_epoch:
            raise ValueError(f"set_epoch is for per-epoch passes, but this {self._kind} was built with "
                             "per_epoch=False (one pass yields the whole run); drop per_epoch=False to pass "
                             "over it once per epoch")
        self._epoch_hint = int(epoch)

    def _pass_epoch(self) -> int | None:
        """The epoch of the pass starting now (None: the whole run)."""
        if self._epoch_hint is not None:
            e, self._epoch_hint = self._epoch_hint, None
            return e
        if not self.per_epoch:
            return None
        return min(max(self._position // self.steps_per_epoch, self._epochs_done), self.epochs - 1)

    def _trained_view(self) -> tuple[int, dict, int]:
        """``(steps, counters, epochs_done)`` of the run as trained: here the batches handed out (a loader whose
        consumer fetches ahead leaves those out)."""
        return self._position, self._counters(), self._epochs_done

    def _budget_report(self, trained: bool = True) -> dict:
        """The budget report of the run as trained (:meth:`_trained_view`), or, ``trained=False``, of the batches
        handed out."""
        steps, counters, done = (self._trained_view() if trained else
                                 (self._position, self._counters(), self._epochs_done))
        return budget_report(budget=self.budget, counts=self.budget_counts, m=self._pass_m,
                             full_data_steps=self.epochs * self.full_steps_per_epoch, planned_steps=self.total_steps,
                             steps_done=steps, counters=counters, epochs_done=done)

    def __iter__(self) -> Iterator:
        return self._pass()

    def iter_run(self) -> Iterator:
        """Every remaining batch of the run, epoch after epoch: one loop instead of an epoch loop
        (``for x, y, w in loader.iter_run(): ...``). Each epoch's share is one pass, as in an epoch loop.

        Examples
        --------
        A loader handing out step numbers (as in the class example):

        >>> loader = _StepNumbers(n=1000, m=100, budget=0.3, epochs=2)
        >>> list(loader.iter_run())
        [1, 2, 3, 4, 5, 6]
        >>> loader.epoch
        2
        """
        while self._position < self.total_steps and self._epochs_done < self.epochs:
            self._run_loop = True  # (a pass cut by a load is followed by the next: nothing to say)
            try:
                yield from self
            finally:
                self._run_loop = False

    def _pass(self):
        # the pass takes over when it is first advanced, not at iter(): an iterator only built (a helper that
        # inspects the loader, a second DataLoader iterator not yet read) leaves the running pass alone
        self._token += 1
        token, loads = self._token, self._loads
        hinted = self._epoch_hint is not None
        now = min(max(self._position // self.steps_per_epoch, self._epochs_done), self.epochs - 1)
        e = self._pass_epoch()
        finished = self._position >= self.total_steps or self._epochs_done >= self.epochs
        if finished and not self._warned_done:
            self._warned_done = True
            warnings.warn(
                f"{type(self).__name__}: all planned steps are used ({self.epochs} epochs); this pass yields "
                f"nothing (build it with a larger epochs= to train longer).",
                stacklevel=user_stacklevel(),
            )
        elif hinted and e is not None and not finished:
            e = self._check_hint(e)
        end = self.total_steps if e is None else self._share_end(e)
        if self._open_handed:  # the last pass was left before its end
            # (set_epoch naming a later epoch than the one left: a loop that breaks out of epochs, as it should)
            self._broken_pass(self._open_handed, named_later=hinted and e is not None and self._open_epoch is not None
                              and e > self._open_epoch)
        self._open_handed = 0
        self._pass_started()
        done = self.epochs if e is None else e + 1
        self._pass_e = e
        # the run's next epoch when the pass started: a pass yields from it to epoch e (the usual pass: one
        # epoch's share; several after a set_epoch ahead of the run, or one that completes a broken-off epoch)
        self._pass_first = now if e is None else min(now, e)
        while self._token == token and self._position < end:
            if self.budget_counts == "passes" and not self._replaying():
                train, overhead = self._cost()
                if (train + overhead) / self._pass_m + 1 > end + 1e-9:
                    break
            item = self._step()
            self._open_handed += 1
            self._open_epoch = e
            self._open_done = self._position >= end
            if self._open_done:  # the share's last batch: the epoch is done even if the consumer stops here
                self._finish_epochs(done, at_step=True)
            elif e is None and self.budget_counts == "steps" and self._position % self.steps_per_epoch == 0:
                # one pass over the whole run (per_epoch=False) counting steps: each epoch's share is done as its
                # last batch goes out, as in per-epoch passes (review 152: one "epoch" event for the whole run;
                # under "passes" an epoch ends by its cost, at the next request: review 153)
                self._finish_epochs(self._position // self.steps_per_epoch, at_step=True)
            yield item
            if self._loads != loads:  # a state was loaded while this pass waited: it was the old run's
                self._pass_cut_by_load(hinted, e)
                return
            if self._token != token:  # another pass took a batch while this one waited
                self._superseded()
        if self._token == token:  # ran to its end (not broken off by the consumer)
            self._finish_epochs(done)
            self._open_handed = 0
            self._open_epoch = None

    def _superseded(self):
        """A pass asked for its next batch after another pass over the same object took its first batch:
        the batches are one run's, handed out in order, so the two cannot both go on. Said loudly: ending
        the old pass quietly cut its epoch short, and a scheduler sized from ``len()`` then ended far from
        its end."""
        name = type(self).__name__
        raise RuntimeError(
            f"{name}: this pass was superseded: another pass over the same {self._kind} took its first batch "
            f"(a second iter() over it, or a second iterator of a DataLoader built on it, that was read) while "
            f"this pass was still running. A {name} hands "
            f"out one run's batches in order, one pass at a time: finish or leave a pass before reading the "
            f"next (to look at a batch before training, save state_dict() before and load it after)"
        )

    def _share_end(self, e: int) -> int:
        """The run position at the end of epoch ``e``'s share."""
        return min(self.total_steps, (e + 1) * self.steps_per_epoch)

    def _check_hint(self, e: int) -> int:
        """The epoch of a pass ``set_epoch(e)`` named. An epoch whose share is handed out already is ignored
        (warned about once): the pass yields the run's next epoch, so that an epoch counter of someone
        else's (accelerate's prepared loader calls ``set_epoch`` with its own count, 0 in a resumed
        process) or a ``set_epoch`` made after ``iter()`` started the pass cannot empty every later pass.
        An epoch beyond one not started is warned about (1-based epochs, a skipped epoch, a resumed loop
        without the loader's state: the pass yields several epochs' shares). Completing an epoch broken
        off, with the next one, is the documented behaviour and is not warned about."""
        now = max(self._position // self.steps_per_epoch, self._epochs_done)
        name = type(self).__name__
        # handed out: its share's end reached, or the epoch finished early ("passes": at the cost cap)
        if self._position >= self._share_end(e) or e < self._epochs_done:
            if not self._warned_hint:
                self._warned_hint = True
                warnings.warn(
                    f"{name}: set_epoch({e}) named an epoch whose share is handed out already ({self._position} "
                    f"batches of the run are): ignored, this pass yields epoch {now}, the run's next. set_epoch "
                    f"takes the 0-based epoch about to be trained; with a DataLoader that has worker processes, "
                    f"call it before iter(loader), which starts the sampler's pass at once (a loader prepared by "
                    f"accelerate calls it with its own count: call the prepared loader's set_epoch).",
                    stacklevel=user_stacklevel())
            return min(now, self.epochs - 1)
        # epoch `now` not started: skipped (a pass broken off in it started it; under "passes" the position
        # lags the epochs by the measurements' cost, so it cannot tell); an epoch after it skipped whole
        started = self._open_epoch == now or (
            self.budget_counts == "steps" and self._position > now * self.steps_per_epoch)
        if (e > now + 1 or (e > now and not started)) and not self._drift_said:
            size = (f"{self._share_end(e) - self._position} batches instead of {self.steps_per_epoch}"
                    if self.budget_counts == "steps" else f"until the budget of epochs {now}-{e} is spent")
            state = "has not started" if not started else "is under way"
            # after a load the user holds a state already: the loop's own epoch count is what is off
            advice = (f"A state_dict was loaded (or the run rewound), which continues the run at epoch {now}: count "
                      f"the loop's epochs from there (set_epoch({now}) for the next pass)" if self._loads else
                      "Epochs count from 0; to continue a saved run, load its state_dict")
            warnings.warn(
                f"{name}: set_epoch({e}) is ahead of the run, whose epoch {now} {state} ({self._position} "
                f"batches handed out): this pass yields the shares of epochs {now}-{e}, {size}. {advice}.",
                stacklevel=user_stacklevel())
        return e

    #: how to look at a batch without spending it, in :meth:`_broken_pass`'s warning
    _look_advice = "save loader.state_dict() before looking and load_state_dict() it after"

    def _broken_pass(self, handed: int, named_later: bool = False) -> None:
        """Called when a pass starts after the previous one was left before its end, having handed out
        ``handed`` batches. Said once: they count as trained; a batch only looked at (``next(iter(loader))``
        before the loop) is lost from the run, and a loop that breaks out of epochs without ``set_epoch``
        ends its run short. A pass that handed out its share's last batch is done; one that ``set_epoch``
        started at a later epoch (``named_later``: the loop breaks out of epochs and says which) is what the
        documentation asks for."""
        if self._warned_broken or self._open_done or named_later:
            return
        self._warned_broken = True
        warnings.warn(
            f"{type(self).__name__}: the last pass was left before its end after handing out {handed} "
            f"batch{'es' if handed != 1 else ''}; they count as trained, and this pass continues that epoch's share "
            f"instead of starting the next epoch. {_BREAK_ADVICE} If a batch was taken only to look at it "
            "(next(iter(loader)) before the training loop), the run trains that many batches fewer than planned: "
            f"to look without spending it, {self._look_advice}. (Said once.)",
            stacklevel=user_stacklevel())

    def _pass_started(self) -> None:
        """Called when a pass starts handing out batches."""

    #: the whole-run loop to name after a load inside a pass (a batch sampler read by a DataLoader has none)
    _run_loop_advice = ", or train with loader.iter_run(), which goes on to the run's end"

    def _pass_cut_by_load(self, hinted: bool, e: int | None) -> None:
        """Called when a pass is read on after a ``load_state_dict`` made inside it (a loop that rolls back to a
        checkpoint and goes on): the pass ends there, its batches were the old run's, and the loop takes the
        cut for the end of an epoch. Said once, unless another pass follows for sure: ``iter_run``'s, or one a
        ``set_epoch`` loop starts after a pass it started (``hinted``) at an epoch ``e`` before the last (review
        139: 16 of 24 steps, silently; review 142: a cut in the last epoch, or a whole-run pass, ends the run
        short under set_epoch too)."""
        if self._warned_cut or self._run_loop or (hinted and e is not None and e < self.epochs - 1):
            return
        self._warned_cut = True
        name = type(self).__name__
        how = ("iterate the loader again: a new pass continues from the loaded position" if not self.per_epoch else
               "continue with the loaded run's remaining epochs, for epoch in range(loader.epoch, loader.epochs) "
               "with loader.set_epoch(epoch)" + self._run_loop_advice)
        warnings.warn(
            f"{name}: load_state_dict was called inside this pass, which then ends (its batches were the run's "
            f"before the load): your loop takes that for the end of "
            f"{'the run' if not self.per_epoch else 'an epoch'}, and the run ends short of its plan unless another "
            f"pass follows. After a load inside a pass, {how}. (Said once.)",
            stacklevel=user_stacklevel())

    def _replaying(self) -> bool:
        """Whether the next step hands out a batch decided before a checkpoint or a rewind (the run that
        decided it had its budget checked then; its measurement work is already counted): no cap check."""
        return False

    def _finish_epochs(self, done: int, at_step: bool = False) -> None:
        if done > self._epochs_done:
            self._epochs_done = done
            self._on_epoch_done(at_step)

    def _on_epoch_done(self, at_step: bool = False) -> None:
        """Called once each time an epoch's share has been handed out (subclasses report it). ``at_step``: as
        the batch that completes it is handed out (a batch replayed after a load completed it when it was first
        handed out, too), else at the end of a pass (the consumer asked for more, under "passes" its cost)."""

    def _pass_state(self, position: int | None = None, epochs_done: int | None = None) -> dict:
        return {"position": self._position if position is None else position, "per_epoch": self.per_epoch,
                "budget_counts": self.budget_counts,
                "epochs_done": self._epochs_done if epochs_done is None else epochs_done,
                "open_epoch": self._open_epoch if position is None or position == self._position else None}

    def _checked_pass_state(self, state: dict, position: int) -> tuple[int, int | None]:
        """``(epochs_done, open_epoch)`` of a saved pass state, checked against this loader's plan; raises
        ``ValueError`` before anything is changed (a refused state leaves the loader as it was)."""
        # the pass plan is the loader's own (its arguments): a checkpoint of another plan is refused, not
        # adopted (adopting per_epoch silently changed len() and how much a pass yields)
        for name in ("per_epoch", "budget_counts"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"{type(self).__name__} state dict: saved with {name}={state[name]!r}, but this loader "
                    f"has {name}={getattr(self, name)!r}; build the loader with the saved run's {name}")
        done = state.get("epochs_done", int(position) // self.steps_per_epoch)
        if isinstance(done, bool) or not isinstance(done, (int, np.integer)) or not 0 <= done <= self.epochs:
            raise ValueError(f"{type(self).__name__} state dict: epochs_done must be an integer in "
                             f"[0, {self.epochs}], got {done!r}")
        open_epoch = state.get("open_epoch")  # the epoch a broken-off pass had started (None: none)
        if open_epoch is not None and (isinstance(open_epoch, bool) or not isinstance(open_epoch, (int, np.integer))
                                       or not 0 <= open_epoch <= self.epochs):
            raise ValueError(f"{type(self).__name__} state dict: open_epoch must be None or an integer in "
                             f"[0, {self.epochs}], got {open_epoch!r}")
        return int(done), None if open_epoch is None else int(open_epoch)

    def _load_pass_state(self, state: dict, position: int) -> None:
        done, open_epoch = self._checked_pass_state(state, position)  # everything checked before any change
        self._position = int(position)
        self._epochs_done = done
        self._epoch_hint = None
        self._loads += 1  # passes started before the load stop (they were the old run's; said if read on)
        self._warned_done = False
        self._open_handed = 0  # what a broken-off pass handed out is accounted for by the load (rewind)
        self._open_epoch = open_epoch
        self._warned_hint = False


class _StepNumbers(BudgetedPasses):
    """The examples' loader, the smallest subclass of :class:`BudgetedPasses`: it plans per-epoch passes
    whose budget counts steps, each step hands out the next step number (1, 2, ...) and costs ``m``
    training examples and no measurement."""

    def __init__(self, n: int, m: int, budget: float, epochs: int) -> None:
        self.budget = budget
        self._plan_passes(n=n, m=m, budget=budget, epochs=epochs, per_epoch=True, budget_counts="steps")

    def _step(self) -> int:
        self._position += 1
        return self._position

    def _counters(self) -> dict:
        return {"train_examples": self._position * self._pass_m, "forward_examples": 0, "backward_examples": 0}
