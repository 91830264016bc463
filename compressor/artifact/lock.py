"""One build at a time per output folder, and no temporary folder outliving the build that made it.

Every build that publishes (`compress run`, `compile_artifact`, a `--budget` search, a speech artifact) holds
`output_lock(OUTPUT)` from its start, before minutes of passes, to its end: an exclusive `flock` on `.NAME.lock`
beside the output, the file holding the holder's PID, host and start time. A second build to the same output is
refused in one line naming that PID (exit 2). The kernel drops a flock when its process dies, however it dies
(SIGKILL, power cut), so a lock file left behind blocks nothing.

A build's scratch lives beside its output under names that say whose it is: `.NAME.tmp-XXXXXXXX` (being written),
`.NAME.old-DIGITS` (the artifact being replaced, for a moment) and `.NAME.budget-N` (a `--budget` attempt). Such a
folder is stale when nobody holds NAME's lock: its build is gone. Each build removes the stale folders of its parent
when it takes its lock, so what a killed build left is gone by the next build into the same folder. Ownership is read
from the lock rather than from a PID written into the folder: a live lock cannot be mistaken for a recycled PID, a
dead one needs no cleaning, and nothing has to be kept out of the artifact's hashed files.

`signals_deferred()` holds SIGINT, SIGTERM and SIGHUP over the two renames that publish an artifact (the old one
moved aside, the new one into place), so an interruption lands before or after them, never between.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

from compressor.errors import UsageError

try:
    import fcntl
except ImportError:  # not a POSIX system: builds run unlocked
    fcntl = None

LOCK_WAIT = 1.0  # seconds a build retries a lock that another build only probes (see _holder_alive)
SCRATCH = (re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$"),  # tempfile.mkdtemp's 8 characters
           re.compile(r"^\.(?P<name>.+)\.old-\d+$"),
           re.compile(r"^\.(?P<name>.+)\.budget-\d+$"))

_held: dict[str, int] = {}  # lock file (absolute) -> thread that holds it, in this process
_guard = threading.Lock()
_published: set[str] = set()  # outputs (absolute) this process published


def lock_path(output: str | Path) -> Path:
    output = Path(os.path.abspath(output))
    return output.with_name(f".{output.name}.lock")


def old_path(output: Path) -> Path:
    """Where publish() moves the artifact it replaces for the moment between the two renames."""
    return output.with_name(f".{output.name}.old-{os.getpid()}{time.time_ns() % 10 ** 12:012d}")


@contextlib.contextmanager
def output_lock(output: str | Path):
    """Hold the build lock on `output` for the block (reentrant within a thread: a `compress run` that holds it calls
    compile_artifact, which takes it too). Creates the output's missing parent folders (removed again if the build
    leaves them empty), refuses a second build (UsageError, exit 2), and removes the stale scratch beside it."""
    path = lock_path(output)
    key, me = str(path), threading.get_ident()
    with _guard:
        if _held.get(key) == me:
            reentered = True
        else:
            reentered = False
    if reentered:
        yield
        return
    created = _make_parents(path.parent)
    try:
        fd = _acquire(path, Path(output))
    except BaseException:
        _remove_empty(created)
        raise
    with _guard:
        _held[key] = me
    try:
        if fd is not None:
            sweep_stale(path.parent, path.name[1:-len(".lock")])
        yield
    finally:
        with _guard:
            _held.pop(key, None)
        _release(path, fd)
        _remove_empty(created)


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
    return missing  # deepest first


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:
        try:
            f.rmdir()
        except OSError:  # not empty (the artifact was published into it) or gone
            return


def _acquire(path: Path, output: Path) -> int | None:
    """An open descriptor holding the flock on `path`, or None where the file system has no flock (unlocked)."""
    if fcntl is None:
        return None
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise UsageError(f"output '{output}' is being built by another compress run ({holder}); wait for it to "
                             f"finish or choose another --output") from None
        except OSError:  # no flock on this file system (some network mounts): build unlocked, as before
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file as we opened it: lock the one there now
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": _dt.datetime.now().isoformat(timespec="seconds"),
                                 "output": str(output)}).encode())
        return fd


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "PID unknown"
    where = "" if info.get("host") in (None, socket.gethostname()) else f" on {info['host']}"
    since = f", started {str(info['started']).replace('T', ' ')}" if info.get("started") else ""
    return f"PID {info['pid']}{where}{since}"


def _release(path: Path, fd: int | None) -> None:
    """Remove the lock file while still holding it (a build that opened it meanwhile sees it gone and retries)."""
    try:
        if fd is None or os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    if fd is not None:
        os.close(fd)


def _holder_alive(lock: Path) -> bool:
    """Whether a build holds this lock now. Probed by taking it for an instant: a lock nobody holds is a leftover of
    a build that died, and is removed (a build that opens it meanwhile sees it gone and retries; one that finds it
    held by the probe retries for LOCK_WAIT)."""
    try:
        fd = os.open(lock, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: keep what it guards
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                lock.unlink()
        except FileNotFoundError:
            pass
        return False
    finally:
        os.close(fd)


def sweep_stale(parent: Path, own: str) -> list[Path]:
    """Remove the scratch folders in `parent` whose build is gone; `own` is the name whose lock the caller has just
    taken (its scratch is stale by definition: the caller has made none yet). Returns what was removed."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    owners: dict[str, list[Path]] = {}
    for e in entries:
        if not e.name.startswith("."):
            continue
        for pattern in SCRATCH:
            m = pattern.match(e.name)
            if m:
                if e.is_dir(follow_symlinks=False):
                    owners.setdefault(m["name"], []).append(Path(e.path))
                break
    removed = []
    for name, folders in owners.items():
        if name != own:
            lock = parent / f".{name}.lock"
            with _guard:
                mine = str(lock) in _held  # a build further up this process (a --budget search's attempts)
            if mine or _holder_alive(lock):
                continue
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)
            removed.append(f)
    return removed


@contextlib.contextmanager
def signals_deferred(signums=(signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))):
    """Hold these signals for the block and deliver them after it, to whatever handlers were there before (the
    CLI's, Python's KeyboardInterrupt, or the default action). Only the main thread receives signals; elsewhere the
    block runs as it is."""
    signums = [s for s in signums if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def note_published(output: Path) -> None:
    _published.add(os.path.abspath(output))


def was_published(output: str | Path) -> bool:
    """Whether this process published an artifact at `output` (an interruption after it must not say otherwise)."""
    return os.path.abspath(output) in _published
