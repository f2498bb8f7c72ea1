"""Ctrl-C held over a block: taken when the block ends, or at once when pressed twice."""

import os
import signal
import time

import pytest

from darec_dist.signals import ctrl_c_held


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # (the handler runs in here)


def test_one_ctrl_c_is_taken_when_the_block_ends():
    before = signal.getsignal(signal.SIGINT)
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            ctrl_c()
            finished = True
    assert finished and signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_is_taken_at_once():
    """A block that never ends (a wait on a hung DataLoader worker) must not leave Ctrl-C without effect."""
    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            ctrl_c()
            reached.append("after the first")
            ctrl_c()
            reached.append("after the second")
    assert reached == ["after the first"] and signal.getsignal(signal.SIGINT) is before



def test_an_ignored_ctrl_c_stays_ignored():
    """A job started in the background by a script ignores SIGINT; the held block turned it back on."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_held():
            ctrl_c()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
