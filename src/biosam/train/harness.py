"""What every trainer in :mod:`biosam.train` shares: the run around one epoch of training.

The decoder, SAM fine-tuning and the mask classifier each supply one epoch (train,
then validate) as a function returning the epoch's numbers and its score; this
module owns the rest:

- :func:`split`: the training/validation split of image pairs (or sources);
- :func:`check_output` and :func:`save_atomic`: an existing output is replaced only
  when asked, and nothing is ever left half written;
- :class:`ResumeFile` and :class:`RunState`: the state saved after every epoch as
  ``OUTPUT.resume`` and the checks that a resumed run has the same data and settings;
- :func:`run_epochs`: the epoch loop, which keeps the best epoch and stops when the
  score has not improved for ``patience`` epochs or a time budget is spent;
- :func:`progress_bar`: the progress bars (tqdm).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import xxhash
from tqdm.auto import tqdm

from biosam.errors import InputError
from biosam.settings import Rule, check, within

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "MAX_VAL_FRACTION",
    "MODEL_SUFFIXES",
    "RESUME_SUFFIX",
    "ResumeFile",
    "RunState",
    "check_output",
    "data_signature",
    "optional",
    "progress_bar",
    "resume_path",
    "run_epochs",
    "save_atomic",
    "split",
    "val_fraction_rule",
]

RESUME_SUFFIX = ".resume"
MODEL_SUFFIXES = (".pt", ".pth")
DEFAULT_VAL_FRACTION = 0.2
# at least a tenth of the data stays for training
MAX_VAL_FRACTION = 0.9
# what every resume file holds, whichever trainer wrote it
_RESUME_KEYS = ("epoch", "history", "best", "since_best", "optimizer", "scheduler", "model", "data", "settings")

T = TypeVar("T")


# ------------------------------------------------------------------ settings helpers
def optional(value: object, checked: Rule) -> Rule:
    """``checked`` for a setting that may also be None (None passes)."""
    return (True, "") if value is None else checked


def val_fraction_rule(value: object) -> Rule:
    """The share of the data held out for validation lies in ``[0, MAX_VAL_FRACTION]``."""
    return within("val_fraction", value, 0.0, MAX_VAL_FRACTION)


# ------------------------------------------------------------------ data
def split(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """``(training, validation)`` items, each in the given order.

    ``round(fraction * n)`` items, at least one and never all of them, are held
    out, chosen by ``seed``; with ``fraction`` 0 or a single item all train.
    """
    check("validation split", [val_fraction_rule(fraction)])
    items = list(items)
    if fraction == 0 or len(items) < 2:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(max(1, round(fraction * len(items))), len(items) - 1)
    return [items[i] for i in sorted(order[n_val:])], [items[i] for i in sorted(order[:n_val])]


def data_signature(train_pairs: Iterable[tuple], val_pairs: Iterable[tuple]) -> str:
    """A hash of the training and validation file pairs (their paths, in order): what a resumed run must match."""
    h = xxhash.xxh3_64()
    for p in [*train_pairs, None, *val_pairs]:
        h.update(repr(p and (str(p[0]), str(p[1]))).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ files
def check_output(path: str | os.PathLike, replace: bool, suffixes: tuple[str, ...] = MODEL_SUFFIXES) -> Path:
    """Refuse, before any work, an output of another type or one that exists unless ``replace`` (see
    :func:`biosam.io.files.check_output_path`; the error names the file and the fix)."""
    from biosam.io.files import check_output_path

    return check_output_path(path, suffixes, replace)


def save_atomic(path: str | os.PathLike, payload: object) -> Path:
    """``torch.save`` through a temporary file in the same folder, so a failed write leaves nothing behind."""
    from biosam.io.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def resume_path(output: str | os.PathLike) -> Path:
    """Where a training run writing ``output`` keeps the state it resumes from (``OUTPUT.resume``)."""
    output = Path(output)
    return output.with_name(output.name + RESUME_SUFFIX)


# ------------------------------------------------------------------ resuming
@dataclass
class RunState:
    """Where an epoch loop stands: the last finished ``epoch``, every epoch's row of numbers (``history``),
    the ``best`` epoch and its score (None before the first epoch) and the epochs run since the best."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "score": None})
    since_best: int = 0


class ResumeFile:
    """The state a run saves after every epoch beside its output, and the checks before resuming from it.

    One format for every trainer: the loop's :class:`RunState`, the optimizer and
    scheduler states, the trained tensors (``model``), the :func:`data_signature`
    and the settings, plus what a trainer adds. ``free`` names the settings a
    resumed run may change (more epochs, say).
    """

    def __init__(self, output: str | os.PathLike, signature: str, settings: dict, free: Sequence[str] = ()) -> None:
        self.path = resume_path(output)
        self.signature = signature
        self.settings = settings
        self.free = tuple(free)

    def _fixed(self, settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k not in self.free}

    def load(self, resume: bool, check: Callable[[dict], None] | None = None) -> dict | None:
        """The saved state when ``resume`` (None otherwise), refused unless it was saved for the same data and
        settings; ``check`` may refuse it first for the trainer's own reasons (raising :class:`InputError`)."""
        if not resume:
            if self.path.exists():
                logger.info("starting anew: replacing %s", self.path)
            return None
        if not self.path.is_file():
            raise InputError(f"--resume: no saved training state at {self.path}; start without --resume.")
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not set(_RESUME_KEYS) <= set(state):
            raise InputError(f"--resume: {self.path} was written by another version of biosam and cannot be "
                             "continued; start anew without --resume.")
        if check is not None:
            check(state)
        if state["data"] != self.signature or self._fixed(state["settings"]) != self._fixed(self.settings):
            raise InputError(
                f"--resume: {self.path} was saved for other images or settings; use the same options or start anew."
            )
        return state

    @staticmethod
    def restore(state: dict, optimizer: torch.optim.Optimizer, scheduler: Any) -> RunState:
        """Put the optimizer and scheduler back where ``state`` left them and return the loop's state."""
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        run = RunState(state["epoch"], state["history"], state["best"], state["since_best"])
        logger.info("resuming after epoch %d (best so far: epoch %d)", run.epoch, run.best["epoch"])
        return run

    def save(self, run: RunState, optimizer: torch.optim.Optimizer, scheduler: Any, model: dict,
             **extra: object) -> None:
        """Write the state after ``run.epoch`` (atomically: an interrupted write keeps the previous epoch's)."""
        save_atomic(self.path, {
            "epoch": run.epoch, "history": run.history, "best": run.best, "since_best": run.since_best,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "model": model,
            "data": self.signature, "settings": self.settings, **extra,
        })


# ------------------------------------------------------------------ the loop
def progress_bar(iterable: Iterable[T] | None = None, *, desc: str, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm progress bar, shown only when ``enabled``."""
    return tqdm(iterable, desc=desc, disable=not enabled, **kwargs)


def _better(score: Any, best: Any) -> bool:
    return best is None or score > best


def run_epochs(
    run: RunState,
    epochs: int,
    epoch: Callable[[int], tuple[dict, Any]],
    *,
    patience: int | None = None,
    minutes: float | None = None,
    on_best: Callable[[int], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
    desc: str = "epochs",
    progress: bool = True,
) -> str | None:
    """Run epochs ``run.epoch + 1 .. epochs`` and say why it stopped early (``"patience"``, ``"time"``) or None.

    ``epoch(n)`` trains and validates epoch ``n`` and returns its row of numbers
    (with ``"epoch": n``) and its score (higher is better; any comparable value).
    The row joins ``run.history``; a better score than every earlier one makes
    ``n`` the best epoch and calls ``on_best(n)`` (write the output). Then
    ``after_epoch(n)`` saves the state to resume from. The loop stops after
    ``patience`` epochs without a better score or the epoch that ends ``minutes``.
    """
    if patience is not None and run.since_best >= patience:
        return "patience"  # a resumed run that had already stopped
    started = time.perf_counter()
    bar = progress_bar(range(run.epoch + 1, epochs + 1), desc=desc, enabled=progress, unit="epoch",
                       initial=run.epoch, total=epochs)
    stopped = None
    for n in bar:
        row, score = epoch(n)
        run.history.append(row)
        run.epoch = n
        if _better(score, run.best["score"]):
            run.best, run.since_best = {"epoch": n, "score": score}, 0
            if on_best is not None:
                on_best(n)
        else:
            run.since_best += 1
        logger.info("epoch %d: %s", n, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k not in ("epoch", "seconds")}
                        | {"best": run.best["epoch"]})
        if after_epoch is not None:
            after_epoch(n)
        if patience is not None and run.since_best >= patience:
            logger.info("no improvement for %d epochs: stopping after epoch %d", run.since_best, n)
            stopped = "patience"
            break
        if minutes is not None and time.perf_counter() - started >= minutes * 60:
            logger.info("time budget of %g minutes reached after epoch %d", minutes, n)
            stopped = "time"
            break
    bar.close()
    return stopped
