"""What a running search shows: bars on a terminal, one line per evaluation otherwise, nothing with -q.

On a TTY (tqdm): a study bar (finished/target trials, best so far, ETA) and a trial bar (step, loss,
validation accuracy). Elsewhere (a log file, CI, a worker whose output its parent prefixes): one line per
evaluation and per finished trial. A failed trial is one line on the console; its traceback goes to a log
file beside the storage.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

QUIET, LINES, BARS = "quiet", "lines", "bars"


_active: Progress | None = None


def active() -> Progress:
    """The progress the running command shows (a quiet one, which still reports failures, if none was set)."""
    global _active
    if _active is None:
        _active = Progress(QUIET)
    return _active


def activate(progress: Progress | None) -> None:
    global _active
    _active = progress


def choose_mode(quiet: bool, stream: TextIO | None = None) -> str:
    if quiet:
        return QUIET
    return BARS if (stream or sys.stderr).isatty() else LINES


class Progress:
    """Told about trials by the objective (start, step, evaluation, end); shows them in `mode`."""

    def __init__(self, mode: str, target: int | None = None, done: int = 0, best: float | None = None,
                 failure_log: Path | None = None, stream: TextIO | None = None) -> None:
        self.mode, self._stream, self.failure_log = mode, stream, failure_log
        self.best, self.done, self.target = best, done, target
        self.trial_bar: tqdm | None = None
        self.study_bar = None
        if mode == BARS:
            self.study_bar = tqdm(total=target, initial=done, desc="trials", unit="trial", position=0,
                                  file=self.stream, dynamic_ncols=True, leave=True)
            self._show_best()

    @property
    def stream(self) -> TextIO:  # looked up when used: sys.stderr may be replaced (pytest, a redirect)
        return self._stream or sys.stderr

    # --- the objective's calls -------------------------------------------------------------------------
    def start_trial(self, number: int, max_steps: int, params: dict[str, Any], resumed_from: int = 0) -> None:
        self.number, self.max_steps = number, max_steps
        if self.mode == BARS:
            self.trial_bar = tqdm(total=max_steps, initial=resumed_from, desc=f"trial {number}", unit="step",
                                  position=1, file=self.stream, dynamic_ncols=True, leave=False)
        elif self.mode == LINES:
            resuming = f", resuming at step {resumed_from}" if resumed_from else ""
            self._line(f"trial {number} started ({params_text(params)}){resuming}")

    def step(self) -> None:
        if self.trial_bar is not None:
            self.trial_bar.update()

    def evaluated(self, point: dict[str, float]) -> None:
        if self.trial_bar is not None:
            self.trial_bar.set_postfix(loss=f"{point['train_loss']:.3f}", valid_acc=f"{point['valid_acc']:.4f}")
        elif self.mode == LINES:
            self._line(f"trial {self.number} step {int(point['step'])}/{self.max_steps}: loss "
                       f"{point['train_loss']:.4f}, valid_acc {point['valid_acc']:.4f}")

    def end_trial(self, number: int, state: str, value: float | None, reason: str = "", detail: str = "",
                  study_so_far: tuple[int, float | None] | None = None) -> None:
        """state: COMPLETE, PRUNED or FAIL; a failure's `detail` (its traceback) goes to the failure log.
        `study_so_far`: (finished trials, best value) of the whole study, other workers' included."""
        if self.trial_bar is not None:
            self.trial_bar.close()
            self.trial_bar = None
        if study_so_far is not None:  # read after this trial ended: it counts this one
            self.done, self.best = study_so_far
        elif state != "FAIL":
            self.done += 1
        if state == "FAIL":
            where = self._log_failure(number, reason, detail) if detail else None
            self._say(f"trial {number} failed: {reason}" + (f" (traceback: {where})" if where else ""))
        else:
            if state == "COMPLETE" and value is not None and (self.best is None or value > self.best):
                self.best = value
            if self.mode == LINES:
                of = f"{self.done}/{self.target}" if self.target else f"{self.done}"
                self._line(f"trial {number} {state.lower()}: valid_acc {_value(value)} (best so far "
                           f"{_value(self.best)}; {of} finished)")
        if self.study_bar is not None and state != "FAIL":
            self.study_bar.update()
            self._show_best()

    def close(self) -> None:
        for bar in (self.trial_bar, self.study_bar):
            if bar is not None:
                bar.close()

    # --- helpers --------------------------------------------------------------------------------------
    def _show_best(self) -> None:
        if self.study_bar is not None and self.best is not None:
            self.study_bar.set_postfix(best=f"{self.best:.4f}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def say(self, text: str) -> None:
        """One line shown in every mode (-q too), without breaking the bars."""
        self._say(text)

    def _say(self, text: str) -> None:  # shown in every mode, without breaking the bars
        if self.mode == BARS:
            tqdm.write(text, file=self.stream)
        else:
            self._line(text)

    def _log_failure(self, number: int, reason: str, detail: str) -> Path | None:
        if self.failure_log is None:
            return None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.failure_log.parent.mkdir(parents=True, exist_ok=True)
        with self.failure_log.open("a") as f:
            f.write(f"--- {stamp} trial {number} failed: {reason}\n{detail}\n")
        return self.failure_log


def format_exception(err: BaseException) -> str:
    return "".join(traceback.format_exception(err))


def params_text(params: dict[str, Any]) -> str:
    """A trial's parameters on one line: d_model=64, lr=0.003469 (floats to 4 significant digits)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
