"""Files slmops writes and reads: whole or not at all, one writer each, known by their content hash.

Outputs appear whole or not at all: build in a hidden sibling folder, rename into place.

One writer per output: a run holds an flock on `.slmops-lock-<name>` next to the output while it
writes, so a second run aimed at the same folder stops at once with a clear error instead of
computing for minutes and colliding at the end. The kernel drops the lock when the process dies,
even by SIGKILL, so there are no stale locks to clean up.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from slmops.core.compat import raise_if_interrupted
from slmops.core.errors import RunError

PARTIAL_PREFIX = ".slmops-partial-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


LOCK_PREFIX = ".slmops-lock-"


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold the exclusive lock for writing `target`; RunError at once if another process holds it."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f"{LOCK_PREFIX}{target.name}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RunError(
                f"output folder '{target}' is being written by another slmops run ({holder or 'unknown'}); "
                "wait for it to finish, or pass another -o/--output"
            ) from None
        try:  # the holder before us may have unlinked this file: then our lock guards nothing
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def write_file(path: Path, write: Callable[[Path], object], fsync: bool = False) -> None:
    """Write one file whole or not at all: `write` fills a hidden temporary file beside `path`, which is
    then renamed over it (fsync first, when a power cut must not leave an empty file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str, fsync: bool = False) -> None:
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; rename it to `target` if the block succeeds.

    On any error or interrupt the temporary folder is removed, so no half-written output ever
    carries the target's name. An existing target is never overwritten.
    """
    target = Path(target).absolute()  # configs built inside name absolute paths (Olive runs elsewhere)
    _refuse_existing(target)
    with output_lock(target):
        _refuse_existing(target)  # finished by the run that held the lock before us
        _remove_stale_partials(target)
        tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{target.name}-", dir=target.parent))
        try:
            yield tmp
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def resumable_dir(target: Path, resume: bool, keep: Callable[[Path], bool], publish: bool = True) -> Iterator[Path]:
    """Like atomic_dir, but the partial folder has a fixed name and outlives a failed run when
    keep(partial) says it holds something to resume from (a checkpoint); `resume` continues in it.
    publish=False: a work folder only (another process writes the output), removed once done."""
    target = Path(target).absolute()
    with output_lock(target):
        _refuse_to_start(target, resume)
        partial = resume_folder(target)
        partial.mkdir(exist_ok=True)
        try:
            yield partial
            if publish:
                _publish(partial, target)
            else:
                shutil.rmtree(partial, ignore_errors=True)
        except BaseException:
            if not keep(partial):
                shutil.rmtree(partial, ignore_errors=True)
            raise


def check_target(target: Path, resume: bool) -> None:
    """What resumable_dir would refuse at once, checked early (before a run is recorded anywhere)."""
    target = Path(target).absolute()
    # Under the lock: a run writing it now is named as such, and a partial folder seen while we
    # hold the lock is a dead run's, not one another run made a moment after we let go.
    with output_lock(target):
        _refuse_to_start(target, resume)


def _refuse_to_start(target: Path, resume: bool) -> None:
    """RunError if `target` is finished, or its partial folder does not match `resume`; call it
    under the lock."""
    _refuse_existing(target)
    partial = resume_folder(target)
    if partial.exists() and not resume:
        raise RunError(
            f"'{target}' has an interrupted run in {partial}; continue it with --resume, "
            "or delete that folder to start over"
        )
    if resume and not partial.exists():
        raise RunError(f"nothing to resume for '{target}': {partial} does not exist; run without --resume")


def resume_folder(target: Path) -> Path:
    """Where a resumable run of `target` builds its output (and keeps its checkpoints until done)."""
    target = Path(target).absolute()
    return target.parent / f"{PARTIAL_PREFIX}{target.name}"


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise RunError(f"output folder '{target}' already exists; pass another -o/--output, or remove it")


def _remove_stale_partials(target: Path) -> None:
    """Partial folders of this target left by a killed run (the lock we hold says none is live)."""
    for stale in target.parent.glob(f"{PARTIAL_PREFIX}{target.name}-*"):
        suffix = stale.name[len(PARTIAL_PREFIX) + len(target.name) + 1 :]
        if len(suffix) == 8 and suffix.replace("_", "").isalnum():  # mkdtemp's suffix, not another target's name
            shutil.rmtree(stale, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    raise_if_interrupted()  # a Ctrl-C a library swallowed still means: do not publish
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
    try:
        tmp.rename(target)
    except OSError as exc:  # something other than slmops made it meanwhile
        raise RunError(
            f"output folder '{target}' appeared while this run was writing ({exc.strerror}); pass another -o/--output"
        ) from None


def file_sha256(path: Path) -> str:
    """Content hash shared by data provenance, model fingerprints and bundle manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(folder: Path) -> str:
    """Content hash of a folder: every file's path (relative) and sha256, in order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
