"""The CLI's progress display: the current stage as a spinner with its elapsed time, each tracked loop as a bar
with its count (see compressor/pipeline/progress.py, which passes and benchmarks report to)."""

from __future__ import annotations

import contextlib
import time

from compressor.pipeline.progress import listening


class ProgressBars:
    def __init__(self, console):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        # Not on a terminal the live display is off: there it draws nothing while running and, when it stops, prints
        # its last frame, an empty line, which put a blank line before a piped error message.
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                                 _count_column(), TimeElapsedColumn(), console=console, disable=not console.is_terminal)
        self.stage, self.stage_text, self.stage_start = None, "", 0.0

    def note(self, line: str) -> None:
        """One line that stays (a result, not progress): shown on a terminal above the bars and in a pipe alike."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def step(self, message: str) -> None:
        self._close_stage()
        self.stage = self.progress.add_task(message, total=None)  # no count: the bar pulses
        self.stage_text, self.stage_start = message, time.perf_counter()

    def start(self, description: str, total: int | None) -> object:
        return self.progress.add_task(f"  {description}", total=total)  # None: no count, the bar pulses

    def advance(self, task: object) -> None:
        self.progress.advance(task)

    def finish(self, task: object) -> None:
        self.progress.remove_task(task)

    def _close_stage(self) -> None:
        """A finished stage leaves one line with its duration (on a terminal; piped stderr stays quiet)."""
        if self.stage is None:
            return
        self.progress.remove_task(self.stage)
        if self.console.is_terminal:
            self.console.print(f"[dim]{self.stage_text} ({time.perf_counter() - self.stage_start:.1f} s)[/dim]")
        self.stage = None


def _count_column():
    """done/total for a loop; nothing for a stage (no count)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Count(ProgressColumn):
        def render(self, task):
            return Text("" if task.total is None else f"{task.completed:.0f}/{task.total:.0f}", style="green")

    return Count()


@contextlib.contextmanager
def progress_bars(console, first: str):
    """Show bars on `console` for the calls made inside the block, starting with stage `first`."""
    bars = ProgressBars(console)
    with bars.progress, listening(bars):
        bars.step(first)
        try:
            yield bars
        finally:
            bars._close_stage()
