"""Ctrl-C held over a block that must not be cut in the middle."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """SIGINT during the block is taken as KeyboardInterrupt when it ends (after the previous handler is back), unless
    the block raised; a second one is taken at once (a block that never ends, such as a wait on a hung DataLoader
    worker, would otherwise leave Ctrl-C without effect). Outside the main thread, which alone may set signal
    handlers, the block runs unprotected. Where SIGINT is ignored (a job started in the background by a script), it
    stays ignored."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    held: list[int] = []

    def hold(signum, frame):
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
