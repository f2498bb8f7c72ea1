"""Ctrl-C held over a block that must not be cut in the middle."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """SIGINT during the block is taken as KeyboardInterrupt when it ends (after the previous handler is back), unless
    the block raised. Outside the main thread, which alone may set signal handlers, the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
