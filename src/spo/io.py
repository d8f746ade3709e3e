"""Atomic outputs: write to a temporary file beside the target, fsync, then rename.

A crash (or kill -9, or a full disk) leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from spo.errors import SpoInputError
from spo.faults import maybe_fail

# Errors of the disk rather than of the program: reported as one line (the user frees space or picks a path).
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (a directory) or fail with a one-line error naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpoInputError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise SpoInputError(f"output directory {path} is not writable")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# Temporaries carry their writer's pid (see atomic_path/atomic_dir), so a live writer's are never touched.
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:p(?P<pid>\d+)\.[^.]+(?:\..*)?\.tmp|old-(?P<old>\d+))$")


def recover_stale(folder: str | os.PathLike, name: str | None = None) -> None:
    """Clean up after writers killed in `folder` (only those of `name`, if given): their temporaries go, and a
    version moved aside by atomic_dir comes back if its replacement never arrived."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _STALE.match(p.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"] or m["old"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        target = folder / m["name"]
        if m["old"] and not target.exists():
            os.replace(p, target)  # killed between moving the old version aside and putting the new one in
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _disk_error(target: Path, exc: BaseException) -> SpoInputError | None:
    """A one-line error for a full (or read-only, or failing) disk; None for anything else."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return SpoInputError(f"cannot write {target}: {exc.strerror or exc}; nothing was changed")
    if type(exc).__name__ == "SafetensorError" and "os error" in str(exc):  # safetensors wraps the OSError
        return SpoInputError(f"cannot write {target}: {str(exc).rsplit(': ', 1)[-1]}; nothing was changed")
    return None


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail early (before any model loads) if `path` cannot be created or written; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpoInputError(f"output {path} exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise SpoInputError(f"output directory {path} is not writable ({probe} is not a folder)")
    # An unnamed temporary file (gone when closed, nothing left behind), not os.access: that answers "yes" to
    # root everywhere, even on read-only or pseudo file systems (/proc, /sys).
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise SpoInputError(f"output directory {path} is not writable ({probe}: {exc.strerror or exc})") from None
    return path


_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")]


def _not_regular(path: Path) -> str | None:
    """What `path` is when it exists and is not a regular file (following a symlink), else None."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # absent, or a dangling symlink: the rename makes a new file
        return None  # (under a regular file: ensure_writable_dir says so)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"{kind} (via a symlink)" if os.path.islink(path) else kind


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse a file output whose path holds anything but a regular file: the atomic rename would replace a
    device node (/dev/full), a FIFO, a socket or a symlink to one with a plain file, and cannot go over a
    directory. Creates nothing."""
    path = Path(path)
    kind = _not_regular(path)
    if kind is not None:
        raise SpoInputError(f"output {path} is {kind}, not a regular file; refusing to replace it")
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` atomically.

    On any exception the temporary file is removed and `target` is untouched.
    """
    target = check_output_file(target)
    ensure_writable_dir(target.parent)
    recover_stale(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.p{os.getpid()}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        maybe_fail("write")  # test seam: a kill or a full disk after the data, before the rename
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get ordinary permissions
        check_output_file(target)  # again: something may have appeared there while the data was written
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        disk = _disk_error(target, exc)
        if disk is not None:
            raise disk from None
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it takes `target`'s place.

    An existing `target` is moved aside first and removed only after the new one is in place.
    """
    target = Path(target)
    _check_output_folder(target)
    ensure_writable_dir(target.parent)
    recover_stale(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.p{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        maybe_fail("write")  # test seam, as in atomic_path
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; outputs get ordinary permissions
        old = None
        _check_output_folder(target)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        disk = _disk_error(target, exc)
        if disk is not None:
            raise disk from None
        raise


def _check_output_folder(target: Path) -> None:
    """atomic_dir replaces a real directory only (never a file, device or symlink it would move aside)."""
    if os.path.islink(target) or (os.path.lexists(target) and not target.is_dir()):
        what = "a symlink" if os.path.islink(target) else (_not_regular(target) or "a file")
        raise SpoInputError(f"output folder {target} is {what}, not a directory; refusing to replace it")


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(tensors: dict, target: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(target, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_image(image, target: str | os.PathLike, pnginfo=None) -> None:
    suffix = Path(target).suffix or ".png"
    with atomic_path(target, suffix=suffix) as tmp:
        image.save(tmp, format=None if suffix.lower() != ".png" else "PNG", pnginfo=pnginfo)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
