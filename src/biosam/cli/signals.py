"""Stopping a command cleanly: SIGTERM (what cluster schedulers send) and SIGINT (Ctrl-C).

While a command runs, both signals become exceptions raised where Python is
running, so the ``finally`` blocks of the output writers remove their temporary
files; the command then exits with the shell's codes, 130 (SIGINT) and 143
(SIGTERM), after a one-line message. A second signal during that cleanup is
ignored so the cleanup finishes (SIGKILL still ends it; the next run writing the
same output removes what is left, see :mod:`biosam.io.files`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

# Only the outermost command installs the handlers (a group's subcommand runs inside it).
_active = threading.local()


class Terminated(BaseException):
    """SIGTERM as an exception; a BaseException so that ``except Exception`` blocks let it pass."""


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGINT raises :class:`KeyboardInterrupt` and SIGTERM :class:`Terminated`, once each.

    Handlers are installed only in the main thread (Python allows no other),
    not for a signal that is ignored, and the previous ones are restored afterwards.
    """
    if getattr(_active, "on", False) or threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handle(signum: int, frame: FrameType | None) -> None:
        if raised:  # already stopping: let the cleanup run to its end
            return
        raised.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated

    # A signal the caller ignores (nohup, a background job's SIGINT) stays ignored.
    previous = {sig: signal.signal(sig, handle) for sig in EXIT_CODES if signal.getsignal(sig) is not signal.SIG_IGN}
    _active.on = True
    try:
        yield
    finally:
        _active.on = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)
