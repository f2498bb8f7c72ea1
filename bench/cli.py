"""Argument types the benchmarks share: a count below its minimum is refused by argparse, before any setup, rather
than printed as a timing (negative, NaN) or met as a ZeroDivisionError inside the workers."""

from __future__ import annotations

import argparse


def at_least(minimum: int):
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return count
