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
    except Exception as err:  # the last resort: resources ran out where no check foresaw it
        problem = _resource_exhaustion(err)
        if problem is None:
            raise
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return EXIT_DATA


def _resource_exhaustion(err: BaseException) -> str | None:
    """One line for an error caused (directly or while handling it) by running out of memory
    or of threads; None for any other error (a bug: its traceback is shown)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError):
            return ("out of memory (MemoryError); free memory, raise the memory limit (ulimit -v) or choose "
                    "smaller sizes")
        if isinstance(err, (ImportError, OSError)) and "failed to map segment" in str(err):
            return ("cannot load a shared library: out of address space (failed to map segment); free memory "
                    "or raise the memory limit (ulimit -v)")
        if isinstance(err, RuntimeError) and "can't start new thread" in str(err):
            return ("cannot start a thread (out of memory or a thread limit); free memory, raise the limits "
                    "(ulimit -v, ulimit -u) or use fewer threads")
        err = err.__cause__ or err.__context__
    return None


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
