"""Progress of long steps, shown by whoever is listening (the CLI draws bars; library calls stay silent).

A loop that takes more than a few seconds wraps its iterable in `track(...)`; a stage announces itself with
`step(...)`. Both report to the listener installed by `listening(...)` for the duration of a call, held in a
context variable, so passes need no callback argument threaded through them and nothing is shared between
concurrent calls.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")


class Listener(Protocol):
    def step(self, message: str) -> None: ...
    def start(self, description: str, total: int | None) -> object: ...
    def advance(self, task: object) -> None: ...
    def finish(self, task: object) -> None: ...


_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar("compressor_progress", default=None)


@contextlib.contextmanager
def listening(listener: Listener | None):
    """Report `step` and `track` calls made inside the block to `listener`."""
    token = _listener.set(listener)
    try:
        yield listener
    finally:
        _listener.reset(token)


def step(message: str) -> None:
    """A new stage of the current call (shown until the next one)."""
    listener = _listener.get()
    if listener is not None:
        listener.step(message)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items`, reporting each one done to the listener as a bar (`total` defaults to len(items))."""
    listener = _listener.get()
    if listener is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    task = listener.start(description, total)
    try:
        for item in items:
            yield item
            listener.advance(task)
    finally:
        listener.finish(task)
