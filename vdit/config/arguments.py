"""argparse types shared by every `vdit` subcommand: numbers checked at parse time, so a wrong
value ends in argparse's one-line error that names the option."""

from __future__ import annotations

import argparse


def number(kind: type, minimum: float, strict: bool = False):
    """An argparse type: a `kind` (int or float) >= `minimum` (> with `strict`); argparse names
    the option in its error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value

    return parse


POSITIVE, NON_NEGATIVE, POSITIVE_FLOAT = number(int, 1), number(int, 0), number(float, 0, True)
