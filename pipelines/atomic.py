"""Files and folders that appear whole or not at all: written beside their
final path under a temporary name, then renamed into place. Readers never see
a half-written file, and ranks that write the same file at once are harmless
(the last rename wins, every version whole)."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Optional


def write_atomically(path: str, write: Callable[[str], None], *, fsync: bool = False,
                     mode: Optional[int] = None) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces
    ``path``. ``fsync``: the data reaches the disk before the rename (survives a
    power cut, not only a crash); ``mode``: its permission bits (temporary files
    are private)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomically(path: str, text: str, *, fsync: bool = False) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_atomically(path, write, fsync=fsync)


def publish_folder(root: str, fill: Callable[[str], None]) -> str:
    """``fill(tmp)`` writes a private folder beside ``root``, renamed to ``root``;
    when another process published ``root`` first, its copy stays and this one
    is dropped. Returns ``root``."""
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, root)
    except OSError:  # another rank was first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
