"""Crash-safe file commits: a file (or directory) is either the old version or the complete new one.

Every helper here follows the same four steps: write under a temporary name in the **same directory**
(so the final rename never crosses a filesystem), ``fsync`` what was written, ``os.replace`` it onto the
final name (atomic on POSIX and Windows), then ``fsync`` the directory so the rename itself survives a
power loss. A failure at any point removes the temporary and leaves the previous version untouched.

Example:
    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> atomic_write_json(os.path.join(d, "profile.json"), {"mean": 0.5})
    >>> json.load(open(os.path.join(d, "profile.json")))
    {'mean': 0.5}
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Callable, Optional

__all__ = [
    "TEMP_MARKER",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_free_space",
    "commit_path",
    "free_bytes",
    "fsync_dir",
    "fsync_path",
    "is_temp_name",
    "link_or_copy",
    "path_size",
    "remove_path",
    "sha256_path",
    "temp_path_for",
]

TEMP_MARKER = ".tmp-"
_CHUNK = 1 << 20


def temp_path_for(final_path: str, tag: Optional[str] = None) -> str:
    """A hidden, unique temporary name beside ``final_path``: ``<dir>/.<name>.tmp-<tag>``.

    Example:
        >>> os.path.basename(temp_path_for("/ckpt/last.ckpt", tag="ab12"))
        '.last.ckpt.tmp-ab12'
    """
    directory, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(directory, f".{name}{TEMP_MARKER}{tag or uuid.uuid4().hex[:12]}")


def is_temp_name(name: str) -> bool:
    """Whether a file name was made by :func:`temp_path_for` (left behind by a crash, safe to delete)."""
    return name.startswith(".") and TEMP_MARKER in name


def fsync_dir(directory: str) -> None:
    """Flush a directory entry (a rename or a new file) to disk; a no-op where directories cannot be opened."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory or ".", flags)
    except (OSError, PermissionError):  # Windows cannot open a directory; its renames are durable already
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems (e.g. certain network mounts) refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """``fsync`` a file, or every file and sub-directory of a directory tree (deepest first)."""
    if not os.path.isdir(path):
        _fsync_file(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_file(os.path.join(root, name))
        fsync_dir(root)


def remove_path(path: str) -> None:
    """Delete a file or a directory tree; a missing path is not an error."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def commit_path(tmp_path: str, final_path: str) -> None:
    """Move a fully written and fsynced ``tmp_path`` onto ``final_path`` atomically, then fsync the directory.

    A file replaces a file in one ``os.replace``. A directory cannot replace a non-empty directory in one
    rename, so the old one is first renamed aside, the new one renamed into place, and the old one deleted:
    a crash in between leaves both complete versions on disk under their temporary names, never a mix.
    """
    directory = os.path.dirname(os.path.abspath(final_path))
    if os.path.isdir(tmp_path) and os.path.isdir(final_path) and not os.path.islink(final_path):
        aside = temp_path_for(final_path, "old-" + uuid.uuid4().hex[:8])
        os.replace(final_path, aside)
        os.replace(tmp_path, final_path)
        fsync_dir(directory)
        remove_path(aside)
    else:
        os.replace(tmp_path, final_path)
    fsync_dir(directory)


def atomic_save(write: Callable[[str], Any], final_path: str, *, tag: Optional[str] = None) -> None:
    """Call ``write(tmp_path)`` and commit what it wrote (a file or a directory) onto ``final_path``.

    ``write`` receives a temporary path in the same directory as ``final_path`` and must create a file or
    a directory there. It is then fsynced and atomically renamed into place, and the directory fsynced. If
    ``write`` or the commit raises, the temporary is removed and the exception propagates; the previous
    ``final_path`` (if any) is untouched.

    Args:
        write: writes the content to the path it is given (e.g. ``lambda p: torch.save(obj, p)``).
        final_path: where the content must end up.
        tag: optional suffix of the temporary name (for recognising one's own leftovers).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> atomic_save(lambda p: open(p, "w").write("hello"), os.path.join(d, "a.txt"))
        >>> open(os.path.join(d, "a.txt")).read()
        'hello'
    """
    directory = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(directory, exist_ok=True)
    tmp = temp_path_for(final_path, tag)
    try:
        write(tmp)
        if not os.path.exists(tmp):
            raise FileNotFoundError(errno.ENOENT, f"atomic_save: the writer did not create {tmp!r}", tmp)
        fsync_path(tmp)
        commit_path(tmp, final_path)
    except BaseException:
        remove_path(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary beside it, fsync, rename, directory fsync)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_save(write, path)


def atomic_write_json(path: str, obj: Any, *, indent: Optional[int] = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically; a reader sees the old or the new document, never half.

    NaN and infinities are refused (``ValueError``) because JSON has no spelling for them: convert them to
    ``None`` first.
    """
    text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def sha256_path(path: str) -> str:
    """SHA-256 of a file, or of a directory tree (over the sorted relative paths and each file's digest)."""
    if not os.path.isdir(path):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            digest.update(rel.encode("utf-8") + b"\0" + sha256_path(full).encode("ascii") + b"\n")
    return digest.hexdigest()


def path_size(path: str) -> int:
    """Size in bytes of a file, or the total of the files in a directory tree."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _d, files in os.walk(path) for f in files)


def free_bytes(directory: str) -> int:
    """Bytes available to this user in the filesystem holding ``directory``."""
    return int(shutil.disk_usage(directory).free)


def check_free_space(directory: str, needed_bytes: int, what: str = "the file") -> None:
    """Raise ``OSError(ENOSPC)`` before writing when ``directory`` has less than ``needed_bytes`` free.

    Example:
        >>> import tempfile
        >>> check_free_space(tempfile.gettempdir(), 1)  # plenty of room: returns quietly
    """
    free = free_bytes(directory)
    if free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space in {directory!r} for {what}: {needed_bytes:,} bytes needed (estimated), "
            f"{free:,} free. Free some space or write to a larger disk",
        )


def link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` a hard link to ``src`` (same content, no extra space), or an fsynced copy where links fail.

    ``dst`` must not exist. A later ``os.replace`` onto either name leaves the other intact, so two names can
    share one file safely.
    """
    try:
        os.link(src, dst)
        return
    except OSError:
        pass  # filesystems without hard links (FAT, some network mounts), or a directory: copy instead
    try:
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
        fsync_path(dst)
    except BaseException:
        remove_path(dst)
        raise
