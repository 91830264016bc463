"""Runtime errors, torch-free. Kept separate from compressor.errors so the runtime imports nothing from the compiler."""


class RuntimeArtifactError(Exception):
    """The artifact cannot be trusted or used: tampered, truncated, missing files, unknown format."""

    exit_code = 2


class FeedError(ValueError):
    """Inputs given to `run` do not match the compiled names, shapes or dtypes."""

    exit_code = 2
