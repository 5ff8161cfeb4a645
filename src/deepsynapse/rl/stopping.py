"""Stopping a run cleanly: SIGINT/SIGTERM finish the current step, the run checkpoints and
exits 0; a second signal stops at once. Every process must agree on the stop, or the next
collective would wait forever for the one that left.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from deepsynapse.rl.ranks import reduce_scalar


@contextlib.contextmanager
def stop_signals_handled(handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    """``handler`` takes SIGINT and SIGTERM while inside; the previous handlers come back."""
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopRequest:
    """Why the run was asked to stop (``reason``; None while it was not)."""

    def __init__(self, accelerator, say: Callable[[str], None]):
        self.accelerator = accelerator
        self.say = say
        self.reason: str | None = None

    @contextlib.contextmanager
    def on_signals(self):
        """SIGINT/SIGTERM: finish the current step, checkpoint, exit 0 (a second one stops now)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.reason:
                raise KeyboardInterrupt
            self.reason = signal.Signals(signum).name
            self.say(f"{self.reason} received: finishing this step, then checkpointing")

        with stop_signals_handled(handler):
            yield

    def requested(self) -> bool:
        """Whether any process asked to stop (all must agree, or collectives would hang)."""
        flag = reduce_scalar(self.accelerator, 1 if self.reason else 0, "max")
        if flag and not self.reason:
            self.reason = "stop requested on another process"
        return bool(flag)
