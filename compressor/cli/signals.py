"""SIGTERM and SIGHUP end a `compress` command the way Ctrl-C does.

A job scheduler, `timeout` or `kill` sends SIGTERM; a closed terminal or ssh session SIGHUP. Python's default for
both is to die on the spot, which skips every `finally`: the build's temporary folder (hundreds of MB, hidden) and
its output lock stay behind. Here they raise `Terminated` in the main thread instead, so the build unwinds like a
KeyboardInterrupt: temporary folders removed, lock released, nothing published; the CLI exits 128 + the signal
number (143, 129). A second signal while that cleanup runs is ignored, so the cleanup finishes.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from compressor.errors import Terminated

SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


@contextlib.contextmanager
def terminate_on_signals():
    """Install the handlers for the block (main thread only; elsewhere signals stay as they were) and restore the
    previous ones after it, so `main(argv)` called in-process leaves its caller's handlers as they were."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:  # already unwinding: let the cleanup finish
            return
        fired.append(signum)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
