"""How a run or a tool ends early, each with its exit code, and how that is said: one line (`say_error`)."""

import argparse
import logging
import os
import sys
import traceback

from sftkit.engines import first_on_its_machine


class SftkitError(Exception):
    """An ending sftkit foresaw, said in one line; the error it came from, if any, is its __cause__."""

    exit_code = 1


class ConfigError(SftkitError):
    """A problem with the user's config or data, reported as one message. Exit code 2."""

    exit_code = 2


class DataError(ConfigError):
    """A row or a source that cannot be turned into training data. Exit code 2."""


class RunFailed(SftkitError):
    """Training or export failed in a way the user can act on (divergence, a full disk); the message says what was
    kept and where. Exit code 1."""


class FailedHere(RunFailed):
    """A RunFailed of this process alone (its final evaluation ran out of memory, say): it says so whatever its rank,
    where the others, left waiting for it, say only that they lost contact."""


class Interrupted(SftkitError):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint; the message says how to resume. Exit code
    128 + the signal's number, as a shell reports a process killed by it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class AlreadyFinished(SftkitError):
    """Nothing to do: `resume_from_checkpoint: auto` found this run finished (a scheduler relaunched a job whose run
    ended as it was stopped). Exit code 0."""

    exit_code = 0


def say_error(prog: str, error: SftkitError) -> int:
    """Say `error` in one line under `prog`, and return its exit code. With SFTKIT_DEBUG=1 its traceback follows,
    with the library error it came from: for a bug report."""
    from sftkit.compat import tell_the_launcher

    line = f"{prog}: error: {error}"
    print(line, file=sys.stderr, flush=True)
    tell_the_launcher(line)
    if os.environ.get("SFTKIT_DEBUG", "0") not in ("", "0"):
        traceback.print_exception(error, file=sys.stderr)
    return error.exit_code


class _WarningsOnStderr(logging.Handler):
    """The `sftkit` logger's warnings as `sftkit: warning: ...` on stderr, each at once, on the stderr of the moment
    (a test's capture replaces it). Said by the first process of each machine only: every process of a launch finds
    the same (an 8-GPU machine printed each 8 times), and each machine keeps its own log."""

    def emit(self, record: logging.LogRecord) -> None:
        if not first_on_its_machine():
            return
        print(f"sftkit: {record.levelname.lower()}: {self.format(record)}", file=sys.stderr, flush=True)


def say_warnings() -> None:
    """Every warning of sftkit's modules (their loggers are `sftkit` and below it) said the same way."""
    logger = logging.getLogger("sftkit")
    if not any(isinstance(handler, _WarningsOnStderr) for handler in logger.handlers):
        logger.addHandler(_WarningsOnStderr(logging.WARNING))


def first_line(error: BaseException) -> str:
    """An exception's first line of text, for a one-line error that quotes it: else its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(error).__name__


def not_utf8(where: str, error: UnicodeDecodeError) -> str:
    """'FILE line 3: not UTF-8 text (...); save it as UTF-8': a file in another encoding is saved again whole."""
    return f"{where}: not UTF-8 text ({error.reason} at byte {error.start}); {NOT_UTF8_FIX}"


NOT_UTF8_FIX = "save it as UTF-8"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's errors as one line, like the config's (it prints its usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")
