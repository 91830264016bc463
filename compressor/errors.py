"""User-facing errors. Each carries the exit code the CLI returns and a one-line message that names the fix."""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VALIDATION = 0, 1, 2, 3


class CompressorError(Exception):
    """Base class: a problem the user can act on; the CLI prints it as one line, never a traceback."""

    exit_code = EXIT_FAILURE


class UsageError(CompressorError):
    """Bad input: a missing path, an unknown pass or option, an impossible schedule, a wrong-shaped feed."""

    exit_code = EXIT_USAGE


class ValidationFailed(CompressorError):
    """The compiled artifact missed a recipe threshold; nothing was published."""

    exit_code = EXIT_VALIDATION
