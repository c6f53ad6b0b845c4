"""The one way every output is written: checked, staged beside its target, swapped in whole.

`staged_output(target, force=..., inputs=..., kind="dir" | "file")` is the only writer of
outputs (checkpoints, ONNX files and folders, Triton repositories, reports):

- the target is checked first (`check_output`): not a symbolic link, not equal to, inside
  or containing any input (`--force` would delete it), parent present and writable, absent
  unless `force`;
- the caller writes into a staging folder beside the target (same file system, so the
  final moves are renames): `.NAME.staging-PID-TOKEN`;
- on success the output is swapped in: what it replaces is first renamed aside
  (`.NAME.old-PID-TOKEN`), the new output renamed in, then the old deleted, so with
  `--force` the old output stays whole until the new one is complete;
- on any exception, Ctrl-C (SIGINT) or SIGTERM (turned into `Terminated` while the block
  runs) the staging folder is removed; a full disk or a denied write is one `UserError` line.

A process killed outright (SIGKILL, power loss) leaves its staging folder behind. Its name
says whose it was: the next `staged_output` for the same target removes staging folders
of dead processes, and puts back an old output that was set aside but not yet replaced.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import Terminated, UserError

KINDS = ("dir", "file")
_STAGING, _OLD = "staging", "old"
# errors of a full or read-only disk: told in one line, not as a traceback
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file size limit reached",
                errno.EDQUOT: "disk quota exceeded", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def check_output(target: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = (),
                 kind: str = "dir", companions: Sequence[str] = ()) -> Path:
    """UserError unless `target` (and its `companions`, file names beside it) may be written.

    Refused: a symbolic link (even dangling); a path equal to, inside or containing an
    input; an existing output without `force`; a folder where a file is asked for (and the
    reverse); a missing or unwritable parent folder. What killed writers of `target` left
    beside it is cleared first (`clear_stale_staging`), so an old output a killed swap set
    aside is back before the checks.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    target = Path(target)
    clear_stale_staging(target)
    for path in (target, *(target.with_name(name) for name in companions)):
        if path.is_symlink():
            raise UserError(f"output {path} is a symbolic link; give the real path")
        resolved = path.resolve()
        for source in inputs:
            source_path = Path(source).resolve()
            if resolved == source_path or source_path in resolved.parents or resolved in source_path.parents:
                relation = ("is" if resolved == source_path else "is inside" if source_path in resolved.parents
                            else "contains")
                raise UserError(f"output {path} {relation} the input {source}; write the output elsewhere")
        if path.exists() and not force:
            raise UserError(f"output {path} already exists (use --force to replace it)")
    if kind == "file" and target.is_dir():
        raise UserError(f"output {target} is a directory; give a file name")
    if kind == "dir" and target.exists() and not target.is_dir():
        raise UserError(f"output {target} is a file, not a folder; remove it or give another name")
    if not target.parent.is_dir():
        raise UserError(f"parent folder of the output does not exist: {target.parent}" if not target.parent.exists()
                        else f"parent of the output is not a folder: {target.parent}")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {target.parent}")
    return target


def prepare_output_dir(out_dir: str | Path, force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """`check_output` for an output folder: the checks a command makes before its long work."""
    return check_output(out_dir, force=force, inputs=inputs, kind="dir")


def _aside_name(target: Path, role: str) -> Path:
    return target.with_name(f".{target.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}")


def _aside_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.({_STAGING}|{_OLD})-(\d+)-[0-9a-f]+$")


def new_staging_dir(target: str | Path) -> Path:
    """A scratch folder beside `target`, named as `staged_output` names its own, for work that spans calls
    (the caller removes it). After a kill, the next `staged_output` of `target` removes it."""
    staging = _aside_name(Path(target), _STAGING)
    staging.mkdir()
    return staging


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def staging_leftovers(target: str | Path) -> list[Path]:
    """Staging and set-aside folders beside `target` (of any process, alive or not)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = _aside_pattern(target.name)
    return sorted(p for p in target.parent.iterdir() if pattern.match(p.name))


def clear_stale_staging(target: str | Path) -> list[Path]:
    """Remove what killed writers of `target` left beside it; returns what was removed.

    A staging folder of a dead process is deleted. A set-aside folder holds the old output
    of a swap that was cut short: each item whose place is empty is put back (the old output
    was never replaced), then the folder is deleted. Folders of live processes are left alone.
    """
    target = Path(target)
    if target.is_symlink():
        return []
    removed = []
    for leftover in staging_leftovers(target):
        role, pid = _aside_pattern(target.name).match(leftover.name).groups()
        if _alive(int(pid)):
            continue
        if role == _OLD:
            for item in leftover.iterdir():
                home = target.with_name(item.name)
                if not home.exists() and not home.is_symlink():
                    os.rename(item, home)
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


def public_path(path: str | Path) -> Path:
    """`path` as the user will see it once every staging folder on it is swapped in (for messages)."""
    parts = list(Path(path).parts)
    for i in reversed(range(len(parts) - 1)):  # the innermost first
        match = re.match(rf"^\.(.+)\.{_STAGING}-\d+-[0-9a-f]+$", parts[i])
        if match:  # a file output's staging folder holds the file itself; a folder's staging folder becomes it
            home = [] if parts[i + 1] == match.group(1) else [match.group(1)]
            return public_path(Path(*parts[:i], *home, *parts[i + 1:]))
    return Path(path)


def _raise_terminated(signum, frame):
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


@contextmanager
def _terminate_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` (SIGINT already raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; its handlers stay as they are
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back during the renames of a swap; they arrive once it is whole."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _swap_in(staging: Path, target: Path, kind: str, companions: Sequence[str]) -> None:
    """Rename what `staging` holds into place; what it replaces goes aside first, then is deleted."""
    if kind == "dir":
        moves = [(staging, target)]
        replaced = [target]
    else:  # companions first, the main file last: a reader that finds the file finds its data
        names = [*companions, target.name]
        moves = [(staging / name, target.with_name(name)) for name in names if (staging / name).exists()]
        replaced = [target.with_name(name) for name in names]  # stale companions go too
    replaced = [path for path in replaced if path.exists() or path.is_symlink()]
    with _signals_blocked():
        aside = None
        if replaced:
            aside = _aside_name(target, _OLD)
            aside.mkdir()
            for path in replaced:
                os.rename(path, aside / path.name)
        for src, dst in moves:
            os.rename(src, dst)
        if aside is not None:
            shutil.rmtree(aside)


def _disk_error(exc: BaseException) -> str | None:
    """The one-line reason when `exc` is a full, read-only or denied disk (also as a Rust I/O error text)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return _DISK_ERRNOS[exc.errno]
    text = str(exc)
    for number, reason in _DISK_ERRNOS.items():
        if f"os error {number})" in text or os.strerror(number) in text:
            return reason
    cause = exc.__cause__ or exc.__context__
    return _disk_error(cause) if cause is not None and cause is not exc else None


@contextmanager
def staged_output(target: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = (),
                  kind: str = "dir", companions: Sequence[str] = ()) -> Iterator[Path]:
    """Write an output through a staging path beside `target`; see the module docstring.

    kind "dir": yields a staging folder to fill; it becomes `target`. kind "file": yields a
    file path inside a staging folder; write it there, and any `companions` (file names,
    e.g. `model.onnx.data`) beside it; they are renamed into `target`'s folder, `target`
    last. A companion the new output lacks is removed from beside `target` (a stale data
    file of an earlier `--force` run). Raises UserError (one line) when `target` may not be
    written (`check_output`) or the disk fills or refuses a write.
    """
    target = check_output(target, force=force, inputs=inputs, kind=kind, companions=companions)
    staging = _aside_name(target, _STAGING)
    with _terminate_raises():
        try:
            staging.mkdir()
            yield staging if kind == "dir" else staging / target.name
            with_default_permissions(staging)
            _swap_in(staging, target, kind, companions)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            reason = _disk_error(exc) if isinstance(exc, Exception) and not isinstance(exc, UserError) else None
            if reason is None:
                raise
            # a denied read (of an input) says which file; a full or read-only disk is the output's
            where = getattr(exc, "filename", None) if reason == "permission denied" else None
            raise UserError(f"cannot write {public_path(target)}: {reason}{f' ({where})' if where else ''}; "
                            "nothing was written") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def with_default_permissions(path: str | Path) -> Path:
    """Give `path` (and, for a folder, what it holds) the permissions a plain create would under the umask.

    Staged files may be private (tempfile and some writers make 0600 files); the finished
    output should be as readable as any file the user writes.
    """
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
    return path


def write_file_atomically(path: str | Path, data: str | bytes, inputs: Sequence[str | Path] = ()) -> Path:
    """Write `data` to `path` (replacing it) through `staged_output`: a reader never sees a half-written
    file, and a failure leaves the old file (or none). The folder must exist."""
    with staged_output(path, force=True, inputs=inputs, kind="file") as staged:
        staged.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


__all__ = ["check_output", "clear_stale_staging", "new_staging_dir", "prepare_output_dir", "public_path",
           "staged_output", "staging_leftovers", "with_default_permissions", "write_file_atomically"]
