"""Stop requests from signals: SIGTERM (a preemption) and Ctrl-C (SIGINT) end a run cleanly.

Both set a flag that the loop reads after each step; it then saves a checkpoint and returns,
instead of dying mid-step with a traceback and whatever the checkpointer's threads were doing (a
KeyboardInterrupt raised inside JAX or an Orbax save aborts the process). A second Ctrl-C
raises ``KeyboardInterrupt`` at once, for when saving itself hangs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """``signal`` is None until a stop is requested, then the signal's number."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str | None:
        """``"SIGTERM"``, ``"SIGINT"``, or None."""
        return None if self.signal is None else signal.Signals(self.signal).name

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        if self.signal is None:
            self.signal = signum
        if signum == signal.SIGINT:
            # os.write, not print: a handler runs between two bytecodes of the main thread,
            # which may be inside a write to the same buffered stream.
            os.write(2, b"\nCtrl-C: stopping after this step to save a checkpoint; press Ctrl-C "
                        b"again to quit without saving\n")


@contextlib.contextmanager
def stop_on_signals(install: bool = True) -> Iterator[StopRequest]:
    """A ``StopRequest`` set by SIGTERM or the first SIGINT while the block runs; the previous
    handlers are restored on exit. Outside the main thread (where Python cannot install
    handlers) or with ``install=False`` (several processes: JAX's preemption service owns
    SIGTERM) nothing is installed and only the caller sets it."""
    request = StopRequest()
    if not install or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
