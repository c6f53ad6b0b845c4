"""Helpers of the fault suite (tests/test_faults.py, tests/test_fault_writes.py)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

FAST = ["--experts", "4", "--max-calib-tokens", "256", "--quiet"]
DEBRIS = re.compile(r"^\..+\.(staging|old)-\d+-[0-9a-f]+$")
REPO = Path(__file__).resolve().parents[1]


def tree_digest(*roots: Path) -> str:
    """sha256 over every path, link target and file's bytes under `roots` (recursively, links not followed)."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted([root, *root.rglob("*")]) if root.is_dir() else [root]:
            digest.update(str(path.relative_to(root.parent)).encode())
            if path.is_symlink():
                digest.update(b"->" + os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def debris(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if DEBRIS.match(p.name)]


def one_error_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1 and message in lines[0], lines
