"""How a run ends early, each with its exit code: the CLI (cli.py) turns these into one line and that code."""


class ConfigError(Exception):
    """A problem with the user's config or data, reported as one message. Exit code 2."""

    exit_code = 2


class RunFailed(Exception):
    """Training or export failed in a way the user can act on (divergence, a full disk); the message says what was
    kept and where. Exit code 1."""

    exit_code = 1


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint; the message says how to resume. Exit code
    128 + the signal's number, as a shell reports a process killed by it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
