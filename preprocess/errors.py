"""User-facing errors and the command-line wrapper that turns them into one line on stderr."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

EXIT_DATA = 1
EXIT_USAGE = 2


class UserError(Exception):
    """A problem with the user's input: reported as one line, never as a traceback.

    The message must name the file/field at fault and say how to fix it.
    """

    def __init__(self, message: str, exit_code: int = EXIT_DATA):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(UserError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2) through ``run_cli``."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None, prog: str) -> int:
    """Run ``main``; print a ``UserError`` as ``prog: error: message`` and return its exit code."""
    try:
        return main(argv)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was published", file=sys.stderr)
        return 130


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
