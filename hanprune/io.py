"""Atomic file output: write to a temporary file beside the target, fsync, rename.
A process killed at any moment leaves the old file or none, never a truncated one."""
import contextlib
import csv
import errno
import io
import json
import os
import tempfile
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(path, size: int | None = None):
    """Yield a temporary path in the target's directory; rename it onto `path` on success. An
    OSError that names no file, or a full disk or quota, is raised again naming `path` and the
    `size` in bytes being written (when given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or (e.errno and not e.filename)):
            writing = "" if size is None else f" (writing {size} bytes)"
            raise OSError(e.errno, f"{e.strerror}{writing}", str(path)) from None
        raise


def write_bytes(path, data: bytes):
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode())


def write_csv(path, header: list[str], rows):
    """A CSV of `header` and `rows` (their fields written as str() gives them: format numbers
    before), with \n line endings."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, text.getvalue())


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(path, obj):
    """torch.save, atomically and byte-for-byte reproducibly (torch names the zip's root folder
    after the file it writes to, so the bytes are serialised in memory, not to the temp file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())
