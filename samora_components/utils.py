"""What every part of the package shares: atomic writes and one-line error messages.

Every file SAMora writes (weights, experts, teachers, model cards, datalists, label volumes, reports,
figures) goes through :func:`atomic_path`: the writer fills a hidden temporary file in the target's
folder, which replaces the target only when writing succeeded. A reader never sees half a file and
a failing run leaves no partial file behind. A run killed outright (SIGKILL, power loss) can leave
its hidden ``.partial-<pid>-...`` file; :func:`remove_stale_partials` clears those of dead processes,
and nothing reads them meanwhile (readers skip hidden files). A write that fails for want of space or
permission is reported as a :class:`WriteError` naming the path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text", "write_json", "first_line", "user_error", "USER_ERRORS", "WriteError",
           "remove_stale_partials", "keep_freed_memory"]

#: errors a user can fix (a wrong path, value or permission): reported as one line, exit status 2
USER_ERRORS = (OSError, ValueError)
#: errors of readers that the package calls on user files without a wrapper of its own (safetensors
#: raises ``SafetensorError`` for a corrupt expert file), recognised by class name: one line, exit 2
_USER_ERROR_NAMES = ("SafetensorError",)

#: why a write can fail although the program is right: full disk or quota, permissions, read-only
#: file system, a file where a folder should be
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                           errno.ENOTDIR, errno.EEXIST, errno.EISDIR})
_PARTIAL = ".partial-"


class WriteError(OSError):
    """A file or folder that cannot be written; its message is one line naming the path."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same folder, same suffixes, so writers that look at
    the extension behave); it replaces ``path`` when the block succeeds and is removed when it fails.
    The folder is created if needed. A full disk, a missing permission or a read-only file system
    raises :class:`WriteError` naming ``path`` (nothing is left behind)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(err.errno, f"cannot create the folder {path.parent} ({err.strerror or err})") from None
    tmp = path.with_name(f"{_PARTIAL}{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if isinstance(err, WriteError) or err.errno not in _WRITE_ERRNOS:
            raise
        raise WriteError(err.errno, f"cannot write {path} ({err.strerror or err})") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # an unwritable folder: then no temporary file was made either
            pass


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` when its process was killed
    (``.partial-<pid>-...`` of processes that no longer run); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f"{_PARTIAL}*"):
        pid = tmp.name[len(_PARTIAL):].split("-", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists (ours counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # not a pid this platform has
        return False
    return True


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, content: object) -> Path:
    """Write ``content`` as indented JSON to ``path`` atomically (non-JSON values as ``str``)."""
    return write_text(path, json.dumps(content, indent=2, default=str) + "\n")


def first_line(err: BaseException) -> str:
    """The first line of an error message (MONAI appends the whole config item to it), or the
    exception's type name when it has no message."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def user_error(err: BaseException | None) -> BaseException | None:
    """The first exception in ``err``'s cause chain that a user can fix (MONAI's config parser wraps
    the errors raised while it instantiates components), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, USER_ERRORS) or type(err).__name__ in _USER_ERROR_NAMES:
            return err
        err = err.__cause__ or err.__context__
    return None


#: glibc ``mallopt`` parameters: M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the system.

    A forward pass allocates and frees the same large activation buffers for every batch. By default
    glibc serves buffers above a few MiB with fresh ``mmap`` calls and gives freed heap memory back,
    so every batch pays page faults again: on a 2-core CPU the system time of ``infer`` was about 40 %
    of its user time (docs/results.md). Buffers up to 32 MiB then come from the heap, which keeps
    up to 2 GiB of freed memory. Called by the command line and by ``BundlePredictor`` (not at
    import). Linux with glibc only (elsewhere nothing changes); the environment variable
    ``SAMORA_SYSTEM_MALLOC=1`` leaves the allocator as it is. Returns whether it applied.
    """
    if os.environ.get("SAMORA_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 2 << 30), (_M_TOP_PAD, 512 << 20)))
