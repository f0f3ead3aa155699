"""Files on disk: the cache directory, content hashes, and writes that are atomic for readers and crashes."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """The lmdistill cache: ``$LMDISTILL_CACHE`` if set, else ``~/.cache/lmdistill``."""
    env = os.environ.get("LMDISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmdistill"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# The name of `staged`'s temporary copy of TARGET: .TARGET.partial-<32 hex digits>
STAGING = re.compile(r"\..+\.partial-[0-9a-f]{32}")


@contextmanager
def staged(target: Path, *, directory: bool = True, keep_existing: bool = False) -> Iterator[Path]:
    """Write `target` under a unique temporary sibling name and rename it into place only when the block succeeds.

    Readers and later runs therefore see either the old target or the complete new one, never a half-written one;
    on an exception the temporary copy is deleted.

    Args:
        target: the file or directory to create.
        directory: whether the staging path is created as an empty directory (else the block creates a file).
        keep_existing: if the target exists by the time the block ends (another process finished the same work
            first), keep it and drop ours; otherwise replace it.

    Yields:
        The staging path to write to.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex}")
    if directory:
        staging.mkdir()
    try:
        yield staging
        if target.exists() and not keep_existing and target.is_dir():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not (keep_existing and target.exists()):
                raise
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()


@contextmanager
def exclusive(lock: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``lock`` (created if missing) for the block, so that processes sharing a
    directory build something in it once: the others wait, then find it built.

    Args:
        lock: the lock file.
        wait: wait for another holder to finish; else yield False at once while another process holds it.

    Yields:
        Whether this process holds the lock.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:  # closing the file releases the lock, also when the process dies
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        yield held


def remove_staging_leftovers(directory: Path) -> list[Path]:
    """Delete the temporary copies that `staged` blocks in `directory` left when their process died (a crash, a kill);
    only for a directory that no running process stages into.

    Returns:
        The paths removed.
    """
    leftovers = [path for path in directory.glob(".*.partial-*") if STAGING.fullmatch(path.name)]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return leftovers
