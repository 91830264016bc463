"""User-facing errors. Each carries the exit code the CLI returns and a one-line message that names the fix."""

import signal

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VALIDATION = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a command ended by Ctrl-C


class CompressorError(Exception):
    """Base class: a problem the user can act on; the CLI prints it as one line, never a traceback."""

    exit_code = EXIT_FAILURE


class UsageError(CompressorError):
    """Bad input: a missing path, an unknown pass or option, an impossible schedule, a wrong-shaped feed."""

    exit_code = EXIT_USAGE


class ValidationFailed(CompressorError):
    """The compiled artifact missed a recipe threshold; nothing was published."""

    exit_code = EXIT_VALIDATION


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (a job scheduler, `timeout`, a closed terminal): raised by the CLI's handler so the
    build unwinds as it does on Ctrl-C (KeyboardInterrupt): temporary folders are removed, the output lock released,
    nothing half-written is published. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it.
    The CLI exits 128 + the signal number (143, 129), as a shell reports a command a signal ended."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"terminated by {signal.Signals(self.signum).name}")
