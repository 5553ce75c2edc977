"""Writing files so that a crash never leaves half of one where a whole one was.

Every file is written under a temporary name beside its target, flushed to disk, and only then
renamed over the target (a rename within a folder is atomic): a reader sees the old file or the
new one, never a mix. Folders are staged the same way and swapped in whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import IO

# The checkout's root: DeepSpeed-Chat's `--data_path local/jsonfile` reads its data/ folder.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fsync_path(path: str) -> None:
    """Flush a file or a folder (its entries: renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """An open file to write `path` through: on success it is flushed and renamed into place; on an
    error the temporary file goes and `path` is left as it was."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def write_json(path: str, data: dict) -> None:
    """Indented JSON (no NaN or inf, which JSON has not), written atomically."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, allow_nan=False)
        handle.write("\n")


def replace_folder(source: str, target: str) -> None:
    """Move a finished folder over `target`; the old one is removed only once the new one is in place."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.isdir(target):
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)
