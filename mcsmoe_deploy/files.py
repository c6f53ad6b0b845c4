"""File helpers shared by every writer: output checks, permissions, atomic writes.

Every output is written beside its target under a temporary name and renamed into place,
so a reader never sees a half-written file or folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def prepare_output_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Check that `out_dir` may be written: its parent exists, it does not exist unless `force`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"output {out_dir} already exists (use --force to replace it)")
    if not out_dir.parent.exists():
        raise UserError(f"parent folder of the output does not exist: {out_dir.parent}")
    return out_dir


def with_default_permissions(path: str | Path) -> Path:
    """Give `path` (and, for a folder, what it holds) the permissions a plain create would under the umask.

    Outputs are staged with tempfile (0700 folders, 0600 files, private while half-written);
    the finished output should be as readable as any file the user writes.
    """
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
    return path


def write_file_atomically(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, renamed into place.

    A reader never sees a half-written file, and a failure leaves the old file (or none).
    The folder must exist.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w" if isinstance(data, str) else "wb") as handle:
            handle.write(data)
        with_default_permissions(tmp)  # mkstemp files are private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


__all__ = ["prepare_output_dir", "with_default_permissions", "write_file_atomically"]
