"""Crash-safe small-file writes: temp file created 0600, fsync, rename, fsync of the directory."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_file_atomically(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o600, replace: bool = True
) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file, never a torn one.

    `replace=False` creates `path` only if it does not exist (FileExistsError otherwise): of writers racing
    to create it, exactly one wins and the others can read the winner's file.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL with the final mode at creation: secrets are never, even briefly, readable by others.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # a umask can only narrow the creation mode; make it exact
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    if replace:
        os.replace(temp, target)
    else:
        try:
            os.link(temp, target)  # atomic and refuses an existing target, unlike rename
        finally:
            temp.unlink(missing_ok=True)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename (or link) itself durable
    finally:
        os.close(dir_fd)
