"""Writers killed, interrupted or terminated mid-write, leftovers of killed runs, a full disk, and the one
staged-output mechanism itself (files.staged_output). Part of the fault suite of issue 11 (see test_faults.py)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mcsmoe_deploy.cli import main

from fault_helpers import DEBRIS, FAST, REPO, debris, one_error_line, tree_digest


# ---- killed, interrupted and terminated mid-write (the console scripts in a subprocess) --------------

# Loaded at start-up by the subprocess (sitecustomize on PYTHONPATH): the first staging folder about to be
# swapped in writes its path to the marker file and waits, so the test signals a writer caught mid-write.
PAUSE_HOOK = '''
import os
import signal
import time
from pathlib import Path

# the signals the test sends reach the writer however pytest was started (a parent that blocks or ignores
# SIGINT passes that on through exec)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
signal.signal(signal.SIGINT, signal.default_int_handler)

marker = os.environ.get("MCSMOE_TEST_PAUSE_MARKER")
if marker:
    import mcsmoe_deploy.files as files

    real = files.with_default_permissions

    def paused(path):
        if ".staging-" in Path(path).name and not os.path.exists(marker):
            Path(marker).write_text(str(path))
            time.sleep(600)
        return real(path)

    files.with_default_permissions = paused
'''


def start_paused(tmp_path: Path, script: str, args: list[str]) -> subprocess.Popen:
    """Run a console script until its first staging folder is complete; the test then signals it."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    marker = tmp_path / "paused"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]),
           "MCSMOE_TEST_PAUSE_MARKER": str(marker), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / script), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the writer never paused: {proc.communicate()}")
        time.sleep(0.05)
    assert Path(marker.read_text()).exists()  # its staging folder is there, complete but not swapped in
    return proc


WRITERS = {  # id -> (console script, arguments after the model, output name)
    "compress": ("mcsmoe", ["compress", "{model}", "{out}", *FAST], "out"),
    "export": ("mcsmoe-export", ["{model}", "{out}.onnx", "--no-validate", "--quiet"], "out.onnx"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_sigkill_mid_write_leaves_no_output_and_the_rerun_cleans_up(writer, tiny_dirs, tmp_path, capsys):
    script, args, name = WRITERS[writer]
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["mixtral"], model)
    before = tree_digest(model)
    args = [a.format(model=model, out=tmp_path / "out") for a in args]
    proc = start_paused(tmp_path, script, args)
    proc.kill()
    proc.wait()
    assert not (tmp_path / name).exists()
    assert debris(tmp_path), "a killed writer leaves its staging folder"
    command = ["export"] if script == "mcsmoe-export" else []
    assert main([*command, *args]) == 0  # the next run removes the dead writer's staging folder
    capsys.readouterr()
    assert (tmp_path / name).exists() and not debris(tmp_path)
    assert tree_digest(model) == before


@pytest.mark.parametrize("writer, sig, code, message", [
    ("compress", signal.SIGTERM, 143, "mcsmoe: terminated (SIGTERM)"),
    ("export", signal.SIGINT, 130, "mcsmoe: interrupted"),
], ids=["sigterm-compress", "sigint-export-force"])
def test_a_signal_mid_write_removes_the_staging_folder(writer, sig, code, message, tiny_dirs, tmp_path):
    script, args, name = WRITERS[writer]
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["mixtral"], model)
    before = tree_digest(model)
    old = tmp_path / name
    if writer == "export":  # with --force, the old output stays whole
        old.write_bytes(b"the old graph")
        args = [*args, "--force"]
    proc = start_paused(tmp_path, script, [a.format(model=model, out=tmp_path / "out") for a in args])
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    one_error_line(err, message)
    assert not debris(tmp_path)
    assert old.read_bytes() == b"the old graph" if writer == "export" else not old.exists()
    assert tree_digest(model) == before


# ---- leftovers of killed runs ------------------------------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_writers_staging_folder_does_not_confuse_the_next_run(tiny_dirs, tmp_path, capsys):
    stale = tmp_path / f".out.staging-{dead_pid()}-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    assert main(["compress", str(tiny_dirs["mixtral"]), str(tmp_path / "out"), *FAST]) == 0
    capsys.readouterr()
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 1000 and not debris(tmp_path)


def test_an_old_output_set_aside_by_a_killed_swap_is_put_back(tiny_dirs, tmp_path, capsys):
    aside = tmp_path / f".out.old-{dead_pid()}-0badc0de"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "config.json").write_text("{}")  # killed after the old output went aside, before the new came in
    assert main(["compress", str(tiny_dirs["mixtral"]), str(tmp_path / "out"), *FAST]) == 2
    one_error_line(capsys.readouterr().err, "already exists (use --force")
    assert (tmp_path / "out" / "config.json").read_text() == "{}" and not debris(tmp_path)


# ---- a full disk ---------------------------------------------------------------------------------------

class SmallDisk:
    """A folder where writes fail past a few KiB: a 2 MiB tmpfs when mounting is allowed (root with
    CAP_SYS_ADMIN), else this process's RLIMIT_FSIZE (writes past the limit fail with EFBIG)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                                 capture_output=True) if shutil.which("mount") else None
        self.how = "tmpfs" if mounted is not None and mounted.returncode == 0 else "rlimit"
        self.limit = None

    def fill(self, leave: int = 48 << 10) -> None:
        if self.how == "tmpfs":
            stat = os.statvfs(self.folder)
            (self.folder / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave))
        else:
            self.limit = resource.getrlimit(resource.RLIMIT_FSIZE)
            self.sigxfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (leave, self.limit[1]))

    def close(self) -> None:
        """Lift the limit (rlimit) or unmount (tmpfs); what was written stays readable until unmounted."""
        if self.limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self.limit)
            signal.signal(signal.SIGXFSZ, self.sigxfsz)
            self.limit = None

    def unmount(self) -> None:
        if self.how == "tmpfs":
            subprocess.run(["umount", str(self.folder)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.close()
    disk.unmount()


@pytest.mark.parametrize("writer, force", [("compress", False), ("compress", True), ("export", True)],
                         ids=["compress", "compress-force", "export-force"])
def test_a_full_disk_is_one_line_and_keeps_the_old_output(writer, force, small_disk, tiny_dirs, tmp_path, capsys):
    out = small_disk.folder / ("out" if writer == "compress" else "out.onnx")
    if force:
        if writer == "compress":
            out.mkdir()
            (out / "config.json").write_text("the old output")
        else:
            out.write_text("the old output")
    small_disk.fill()
    argv = ([writer, str(tiny_dirs["mixtral"]), str(out)] + (FAST if writer == "compress" else ["--quiet", "--no-validate"])
            + (["--force"] if force else []))
    code = main(argv)
    small_disk.close()  # before any assertion, so pytest itself can write files again
    assert code == 2, small_disk.how
    reason = {"tmpfs": "no space left on the device", "rlimit": "file size limit reached"}[small_disk.how]
    one_error_line(capsys.readouterr().err, f"cannot write {out}: {reason}; nothing was written")
    assert not debris(small_disk.folder)
    if force:
        old = out / "config.json" if writer == "compress" else out
        assert old.read_text() == "the old output"
    else:
        assert not out.exists()


# ---- the mechanism itself (files.staged_output) ----------------------------------------------------------

def test_a_failure_inside_the_block_removes_the_staging_and_keeps_the_old_output(tmp_path):
    from mcsmoe_deploy.files import staged_output

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ZeroDivisionError):
        with staged_output(target, force=True) as staging:
            assert staging.parent == tmp_path and DEBRIS.match(staging.name)
            assert signal.getsignal(signal.SIGTERM) is not handler  # SIGTERM raises Terminated in the block
            (staging / "new.txt").write_text("new")
            1 / 0
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old.txt").read_text() == "old"


def test_sigterm_inside_the_block_is_an_exception_that_removes_the_staging(tmp_path):
    from mcsmoe_deploy.errors import Terminated
    from mcsmoe_deploy.files import staged_output

    with pytest.raises(Terminated):
        with staged_output(tmp_path / "out") as staging:
            (staging / "part").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this returns
    assert list(tmp_path.iterdir()) == []


def test_a_file_output_swaps_in_with_its_companions_and_drops_stale_ones(tmp_path):
    from mcsmoe_deploy.files import staged_output

    target = tmp_path / "m.onnx"
    target.write_text("old graph")
    (tmp_path / "m.onnx.data").write_text("old data")  # stale: the new output keeps its weights inside
    (tmp_path / "m.inlined.onnx").write_text("old inlined")
    with staged_output(target, force=True, kind="file", companions=("m.onnx.data", "m.inlined.onnx")) as staged:
        assert staged.name == "m.onnx" and staged.parent.parent == tmp_path
        staged.write_text("new graph")
        staged.with_name("m.inlined.onnx").write_text("new inlined")
        staged.with_name("scratch").write_text("not an output: stays behind in the staging folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.inlined.onnx", "m.onnx"]
    assert target.read_text() == "new graph" and (tmp_path / "m.inlined.onnx").read_text() == "new inlined"


def test_a_live_writers_staging_folder_is_left_alone(tmp_path):
    from mcsmoe_deploy.files import clear_stale_staging

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.staging-{writer.pid}-00c0ffee"
        dead = tmp_path / f".out.staging-{dead_pid()}-00c0ffee"
        live.mkdir()
        dead.mkdir()
        assert clear_stale_staging(tmp_path / "out") == [dead]
        assert live.exists() and not dead.exists()
    finally:
        writer.kill()
        writer.wait()


def test_messages_name_the_output_not_its_staging_folder():
    from mcsmoe_deploy.files import public_path

    nested_file = "/d/.out.onnx.staging-12-ab/.out.onnx.staging-13-cd/out.onnx"  # export_model, then finish_staged
    in_folder = "/d/.sw.staging-1-ab/.encoder.onnx.staging-2-cd/encoder.onnx"  # a Switch folder's graph
    assert [str(public_path(p)) for p in (nested_file, in_folder, "/d/x/out")] == [
        "/d/out.onnx", "/d/sw/encoder.onnx", "/d/x/out"]
