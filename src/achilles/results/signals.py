"""The one SIGTERM mechanism: SIGTERM raised as :class:`Terminated` in the main thread, so
that every ``with`` block unwinds (temp files removed, claimed folders released) as it
does on Ctrl-C.

The CLI wraps each command in ``sigterm_unwinds(die=False)`` and exits 143 on
:class:`Terminated`; an atomic write outside the CLI wraps itself in ``sigterm_unwinds()``,
which, after unwinding, dies of SIGTERM as the sender expects. Nested blocks leave the
handler to the outermost one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C (``BaseException``: no ``except Exception`` eats it)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_unwinds(*, die: bool = True) -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the duration of the block.

    Only in the main thread. Within an outer ``sigterm_unwinds`` the outer one handles it.
    With ``die`` (library use), a handler someone else installed (a test runner) is left in
    place, and a block ended by SIGTERM restores the default action and re-sends the signal
    to die of it; without ``die`` (the CLI) the handler is installed whatever was there and
    :class:`Terminated` propagates to the caller.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is _raise_terminated or (die and previous not in (signal.SIG_DFL, None)):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        if die:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)  # die of SIGTERM as the sender expects
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
