"""What every part of the package shares: atomic writes and one-line error messages.

Every file SAMora writes (weights, experts, teachers, model cards, datalists, label volumes, reports,
figures) goes through :func:`atomic_path`: the writer fills a hidden temporary file in the target's
folder, which replaces the target only when writing succeeded. A reader never sees half a file and
a killed or failing run leaves no partial file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text", "write_json", "first_line", "user_error", "USER_ERRORS"]

#: errors a user can fix (a wrong path, value or permission): reported as one line, exit status 2
USER_ERRORS = (OSError, ValueError)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same folder, same suffixes, so writers that look at
    the extension behave); it replaces ``path`` when the block succeeds and is removed when it fails.
    The folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        if isinstance(err, USER_ERRORS):
            return err
        err = err.__cause__ or err.__context__
    return None
