"""When the loop stops or saves outside its schedule: Ctrl-C / SIGTERM, and checkpoints by wall time.

:class:`StopRequest` turns the first SIGINT or SIGTERM into a request the loop honours after the current
step (it saves, then raises :class:`TrainingInterrupted`); a second signal stops at once. :class:`SaveTimer`
says when ``train.save_every_minutes`` have passed since the last save. Under torchrun the ranks agree
(:func:`agree`) so that all of them save, or stop, at the same step.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import torch

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``checkpoint`` at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"saved the checkpoint {checkpoint}" if checkpoint is not None else "no output folder: nothing saved"
        super().__init__(f"interrupted by {name} after step {step}: {where}; re-run the same command to resume")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequest:
    """``with StopRequest() as stop:`` ... ``stop.signum`` is the first SIGINT/SIGTERM received (or None).

    Handlers are installed only in the main thread (elsewhere Python does not allow it); the previous
    handlers come back on exit.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: stop now, losing the steps since the last save
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class SaveTimer:
    """``due()`` once ``minutes`` of wall time have passed since the start or the last ``reset()``; 0 = never."""

    def __init__(self, minutes: float, clock=time.monotonic) -> None:
        self.seconds = minutes * 60.0
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        return self.seconds > 0 and self.clock() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = self.clock()


def agree(stop: bool, save: bool, ctx) -> tuple[bool, bool]:
    """``(stop, save)`` as any rank says (one tiny all-reduce under torchrun; unchanged for one process)."""
    if not getattr(ctx, "enabled", False):
        return stop, save
    import torch.distributed as dist

    flags = torch.tensor([float(stop), float(save)], device=ctx.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), bool(flags[1].item())
