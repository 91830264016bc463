"""Runtime errors, torch-free. Kept separate from compressor.errors so the runtime imports nothing from the compiler.

Every error the runtime raises on purpose derives from RuntimeUsageError, so callers (and the CLI) catch one class;
each message is one line that names the fix.
"""


class RuntimeUsageError(Exception):
    """A problem the caller can act on: a bad artifact, a bad argument, a missing execution provider."""

    exit_code = 2


class RuntimeArtifactError(RuntimeUsageError):
    """The artifact cannot be trusted or used: tampered, truncated, missing files, unknown format."""


class FeedError(RuntimeUsageError, ValueError):
    """Inputs given to the model do not match the compiled names, shapes or dtypes."""


class FeedTypeError(FeedError, TypeError):
    """An argument of the wrong type (embed(123), load(42)); still a TypeError for code that catches those."""


class ProviderError(RuntimeUsageError):
    """A requested onnxruntime execution provider is not available in this installation."""


class ArtifactKindError(RuntimeUsageError, AttributeError):
    """A method called on the wrong kind of artifact (generate() on a text encoder, transcribe() on a language model);
    still an AttributeError, so hasattr(model, "generate") stays False where the artifact has no such method."""
