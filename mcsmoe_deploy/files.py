"""File helpers shared by every writer: output checks, permissions, atomic writes.

Every output is written beside its target under a temporary name and renamed into place,
so a reader never sees a half-written file or folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError


def prepare_output_dir(out_dir: str | Path, force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Check that `out_dir` may be written: not a symbolic link, apart from every input (not equal to one,
    inside one or containing one: `--force` would delete it), its parent exists, and it does not exist
    unless `force`."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise UserError(f"output {out_dir} is a symbolic link; give the real path")
    target = out_dir.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if target == source_path or source_path in target.parents or target in source_path.parents:
            relation = ("is" if target == source_path else "is inside" if source_path in target.parents
                        else "contains")
            raise UserError(f"output {out_dir} {relation} the input {source}; write the output elsewhere")
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
