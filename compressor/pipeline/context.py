"""What a pass needs from outside the model, handed to it by the framework: `Pass.run(handle, ctx)`.

A pass rewrites the model it is given; it does not read data sets, reload the source or export graphs to time them.
The context carries those services (after Olive, whose passes declare their data and the framework resolves it), so
that no module under passes/ imports the stages that provide them (compressor.sources, compressor.measure,
compressor.lower, compressor.artifact, compressor.program.handle): this module is where they are wired in.

- `calibration`: the calibration inputs every calibrating pass draws (the recipe's `[data] calibration` the handle
  carries, else the built-in sets), as the program takes them, and what they are (`description()`, for records).
- `reference()`: the source model loaded afresh at the handle's shapes, as a new handle (distillation's teacher, the
  dense model a latency budget is timed against).
- `latency`: onnxruntime timings of handles and of modules at several token counts, and the measured-budget loop's
  constants (`attempts`, `tolerance`).
- `progress`: `step` and `track` (compressor.pipeline.progress: reported to whoever listens, silent otherwise).

`PassContext.for_handle(handle)` builds the default; `Pipeline.run(handle)` does so when given none. A test or an
embedding application may hand a pass another context (its own data, a fake clock) without touching the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

from compressor.pipeline import progress as _progress

T = TypeVar("T")


class Calibration(Protocol):
    """Calibration data for one model."""

    @property
    def max_builtin_images(self) -> int:
        """The most calibration images the built-in photographs give (a pass refuses more before it changes anything)."""

    def inputs(self, samples: int, length: int = 256, seed: int = 42, option: str = "calibration_samples",
               length_option: str = "calibration_len") -> tuple[Any, ...]:
        """`samples` calibration inputs as the program takes them (encoders: at the compiled shapes; language models:
        windows of `length` tokens), drawn with `seed`; `option`/`length_option` name the pass options that asked, in
        the one-line refusal when the data holds too little."""

    def description(self) -> str:
        """What `inputs` reads, for the pass's record (the user's file with its hash, or the built-in set)."""

    def paragraphs(self) -> list[str]:
        """The built-in Wikipedia calibration paragraphs (text encoders' default calibration set)."""


class Latency(Protocol):
    attempts: int  # timings of a measured budget's result, at most
    tolerance: float  # a measured budget is re-spent while it misses by more than this fraction of itself

    def time_handles(self, handles: dict[str, Any], repeats: int = 10, threads: int = 2) -> dict[str, float]:
        """Median ms of each handle's program at its compiled shapes, timed interleaved."""

    def time_module_at_sizes(self, module, example: tuple, sizes: list[int], repeats: int = 10,
                             threads: int = 2) -> list[float]:
        """Median ms of `module` at each token count in `sizes` (one export with a dynamic token axis)."""


@dataclass(frozen=True)
class Progress:
    step: Callable[[str], None]
    track: Callable[..., Iterator]


PROGRESS = Progress(_progress.step, _progress.track)


class HandleCalibration:
    """The calibration data of one handle (`compressor.sources.inputs`), read when asked: a pass that changes the
    model (slices it, prunes it) draws through the model as it then stands, as it always has."""

    def __init__(self, handle):
        self.handle = handle

    @property
    def max_builtin_images(self) -> int:
        from compressor.sources.inputs import MAX_BUILTIN_IMAGES

        return MAX_BUILTIN_IMAGES

    def inputs(self, samples: int, length: int = 256, seed: int = 42, option: str = "calibration_samples",
               length_option: str = "calibration_len") -> tuple:
        from compressor.sources.inputs import calibration_inputs

        return calibration_inputs(self.handle, samples, length, seed, option, length_option)

    def description(self) -> str:
        from compressor.sources.inputs import calibration_description

        return calibration_description(self.handle)

    def paragraphs(self) -> list[str]:
        from compressor.sources.inputs import wiki_paragraphs

        return wiki_paragraphs()


class OnnxLatency:
    """onnxruntime timings of exported programs (`compressor.measure.timing`), imported when first used."""

    @staticmethod
    def _timing():
        from compressor.measure import timing

        return timing

    @property
    def attempts(self) -> int:
        return self._timing().LATENCY_ATTEMPTS

    @property
    def tolerance(self) -> float:
        return self._timing().LATENCY_TOLERANCE

    def time_handles(self, handles: dict[str, Any], repeats: int = 10, threads: int = 2) -> dict[str, float]:
        return self._timing().time_handles(handles, repeats, threads)

    def time_module_at_sizes(self, module, example: tuple, sizes: list[int], repeats: int = 10,
                             threads: int = 2) -> list[float]:
        return self._timing().time_module_at_sizes(module, example, sizes, repeats, threads)


@dataclass(frozen=True)
class PassContext:
    calibration: Calibration
    reference: Callable[[], Any]  # ctx.reference(): the source model freshly loaded, as a new handle
    latency: Latency
    progress: Progress = PROGRESS

    @classmethod
    def for_handle(cls, handle) -> "PassContext":
        """The default services for `handle`: its calibration data, its source reloaded, onnxruntime timings and the
        progress listener of the current call. Nothing is loaded until a pass asks."""
        return cls(calibration=HandleCalibration(handle), reference=handle.reloaded,
                   latency=OnnxLatency(), progress=PROGRESS)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        return self.progress.track(items, description, total)

    def step(self, message: str) -> None:
        self.progress.step(message)
