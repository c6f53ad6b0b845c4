"""What a careless or hostile user can do to the CLI, and what must follow (issue 11).

Every fault: a non-zero exit, one stderr line naming the problem, no traceback, the inputs
byte for byte as before, and no debris (no `.NAME.staging-*` / `.NAME.old-*` folder) left.
Beyond bad arguments: processes killed mid-write (SIGKILL, SIGTERM, SIGINT, through the
console scripts), stale staging folders of killed runs, and a full disk (a 2 MiB tmpfs when
this process may mount one, else RLIMIT_FSIZE).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from mcsmoe_deploy.cli import main
from mcsmoe_deploy.contract import external_data_path

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


# ---- what each case starts from ------------------------------------------------------------------

@pytest.fixture(scope="session")
def exported(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny mixtral as a KV-cache graph with its weights in model.onnx.data (exported once)."""
    folder = tmp_path_factory.mktemp("graph")
    assert main(["export", str(tiny_dirs["mixtral"]), str(folder / "model.onnx"), "--no-validate",
                 "--external-data", "--quiet"]) == 0
    return folder


@dataclass
class Ctx:
    tmp: Path
    model: Path  # a copy of the tiny mixtral checkpoint
    graph: Path  # a copy of the exported graph folder (model.onnx + model.onnx.data)
    switch: Path  # a copy of the tiny switch checkpoint

    def fmt(self, arg: str) -> str:
        return arg.format(model=self.model, graph=self.graph, switch=self.switch, tmp=self.tmp, out=self.tmp / "out")


def _relocate(ctx: Ctx, location: str) -> None:
    """Point every external tensor of graph/model.onnx at `location`."""
    import onnx

    path = ctx.graph / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))


def _secret(ctx: Ctx) -> Path:
    """A data file outside the graph's folder (the bytes a hostile graph wants read or copied)."""
    secret = ctx.tmp / "elsewhere" / "secret.data"
    secret.parent.mkdir(exist_ok=True)
    shutil.copyfile(external_data_path(ctx.graph / "model.onnx"), secret)
    return secret


def abs_location(ctx):
    _relocate(ctx, str(_secret(ctx)))


def dotdot_location(ctx):
    _secret(ctx)
    _relocate(ctx, "../elsewhere/secret.data")


def symlink_out(ctx):
    (ctx.graph / "link.data").symlink_to(_secret(ctx))
    _relocate(ctx, "link.data")


def missing_data(ctx):
    external_data_path(ctx.graph / "model.onnx").unlink()


def out_file(ctx):
    (ctx.tmp / "out").write_text("a file where a folder is asked for")


def out_dir(ctx):
    (ctx.tmp / "out").mkdir()
    (ctx.tmp / "out" / "keep.txt").write_text("existing")


def out_dangling(ctx):
    (ctx.tmp / "out").symlink_to(ctx.tmp / "nowhere")


def parent_file(ctx):
    (ctx.tmp / "afile").write_text("not a folder")


def model_link(ctx):
    (ctx.tmp / "link").symlink_to(ctx.model)


def calib(name: str, data: bytes):
    def setup(ctx):
        (ctx.tmp / name).write_bytes(data)
    return setup


def data_exists(ctx):
    (ctx.tmp / "out.onnx.data").write_bytes(b"someone's data")


def inlined_exists(ctx):
    (ctx.tmp / "out.inlined.onnx").write_bytes(b"someone's graph")


def bad_graph(ctx):
    (ctx.tmp / "bad.onnx").write_bytes(os.urandom(256))


def report_json(ctx):
    (ctx.tmp / "report.json").write_text(json.dumps({"schema": "something else"}))


def pickle_decoy(ctx):
    from safetensors.torch import save_file
    import torch

    save_file({"decoy": torch.zeros(4)}, str(ctx.model / "model.safetensors"))
    (ctx.model / "pytorch_model.bin").write_bytes(b"not a pickle: unpickling it would fail loudly")


def empty_safetensors(ctx):
    (ctx.model / "model.safetensors").write_bytes(b"")


def no_model_type(ctx):
    config = json.loads((ctx.model / "config.json").read_text())
    del config["model_type"]
    (ctx.model / "config.json").write_text(json.dumps(config))


def triton_existing(ctx):
    (ctx.tmp / "repo" / "model").mkdir(parents=True)


def empty_folder(ctx):
    (ctx.tmp / "empty").mkdir()


@dataclass(frozen=True)
class Fault:
    id: str
    argv: tuple[str, ...]
    message: str
    setup: object = None


F = Fault
CASES = [
    # compress: outputs
    F("compress-out-is-a-file", ("compress", "{model}", "{out}", "--force"), "is a file, not a folder", out_file),
    F("compress-out-exists", ("compress", "{model}", "{out}"), "already exists (use --force", out_dir),
    F("compress-out-dangling-link", ("compress", "{model}", "{out}", "--force"), "is a symbolic link", out_dangling),
    F("compress-out-parent-missing", ("compress", "{model}", "{tmp}/no/out"), "parent folder of the output does not exist"),
    F("compress-out-parent-is-file", ("compress", "{model}", "{tmp}/afile/out"), "parent of the output is not a folder",
      parent_file),
    F("compress-out-inside-via-link", ("compress", "{model}", "{tmp}/link/small", "--force"), "is inside the input",
      model_link),
    F("compress-input-via-link-is-out", ("compress", "{tmp}/link", "{model}", "--force"), "is the input", model_link),
    # compress: inputs
    F("compress-model-missing", ("compress", "{tmp}/nomodel", "{out}"), "nomodel"),
    F("compress-model-is-a-file", ("compress", "{tmp}/afile", "{out}"), "afile", parent_file),
    F("compress-calib-missing", ("compress", "{model}", "{out}", "--calib", "{tmp}/none.txt"), "none.txt"),
    F("compress-calib-empty", ("compress", "{model}", "{out}", "--calib", "{tmp}/empty.txt"), "empty.txt",
      calib("empty.txt", b"")),
    F("compress-calib-random-bytes", ("compress", "{model}", "{out}", "--calib", "{tmp}/random.txt"), "random.txt",
      calib("random.txt", bytes(range(256)) * 64)),
    F("compress-calib-is-a-folder", ("compress", "{model}", "{out}", "--calib", "{tmp}"), "is not a file"),
    F("compress-experts-zero", ("compress", "{model}", "{out}", "--experts", "0"), "--experts"),
    F("compress-experts-too-many", ("compress", "{model}", "{out}", "--experts", "9"), "--experts"),
    F("compress-rank-ratio-nan", ("compress", "{model}", "{out}", "--rank-ratio", "nan"), "--rank-ratio"),
    F("compress-sparse-keep-negative", ("compress", "{model}", "{out}", "--sparse-keep", "-0.1"), "--sparse-keep"),
    F("compress-max-calib-tokens-zero", ("compress", "{model}", "{out}", "--max-calib-tokens", "0"), "--max-calib-tokens"),
    F("compress-quant-block-uneven", ("compress", "{model}", "{out}", "--quantize", "int4", "--quant-block", "7"),
      "--quant-block"),
    F("compress-pickle-beside-decoy", ("compress", "{model}", "{out}", "--device", "auto"), "of the model's tensors (first: ",
      pickle_decoy),
    F("compress-empty-safetensors", ("compress", "{model}", "{out}"), "model.safetensors", empty_safetensors),
    F("compress-config-without-model-type", ("compress", "{model}", "{out}"), "model_type", no_model_type),
    # export: outputs and inputs
    F("export-out-is-input-folder", ("export", "{model}", "{model}", "--force"), "is a directory"),
    F("export-out-inside-input", ("export", "{model}", "{model}/model.onnx"), "is inside the input"),
    F("export-out-exists", ("export", "{model}", "{tmp}/out.onnx"), "already exists", calib("out.onnx", b"old")),
    F("export-data-file-exists", ("export", "{model}", "{tmp}/out.onnx"), "out.onnx.data already exists", data_exists),
    F("export-inlined-exists", ("export", "{model}", "{tmp}/out.onnx", "--inline"), "out.inlined.onnx already exists",
      inlined_exists),
    F("export-out-dangling-link", ("export", "{model}", "{out}", "--force"), "is a symbolic link", out_dangling),
    F("export-out-parent-missing", ("export", "{model}", "{tmp}/no/out.onnx"), "parent folder of the output"),
    F("export-model-missing", ("export", "{tmp}/nomodel", "{tmp}/out.onnx"), "nomodel"),
    F("export-switch-to-onnx-file", ("export", "{switch}", "{tmp}/out.onnx"), "give a folder name"),
    F("export-switch-inside-input", ("export", "{switch}", "{switch}/onnx", "--force"), "is inside the input"),
    # untrusted graphs: external data outside the folder, missing, or no graph at all
    *(F(f"{command}-{name}", argv, message, setup)
      for command, argv in [("run", ("run", "{graph}/model.onnx", "--prompt", "hi", "--max-new-tokens", "2")),
                            ("bench", ("bench", "{graph}/model.onnx", "--iterations", "1", "--quiet")),
                            ("triton", ("triton", "{graph}/model.onnx", "{tmp}/repo"))]
      for name, message, setup in [("absolute-data", "is not a relative path inside", abs_location),
                                   ("dotdot-data", "leaves", dotdot_location),
                                   ("symlinked-data", "outside", symlink_out),
                                   ("missing-data", "is missing", missing_data)]),
    F("run-not-onnx", ("run", "{tmp}/bad.onnx", "--prompt", "hi"), "is not a readable ONNX file", bad_graph),
    F("run-empty-folder", ("run", "{tmp}/empty", "--prompt", "hi"), "is a directory", empty_folder),
    F("run-save-optimized-over-graph", ("run", "{graph}/model.onnx", "--prompt", "hi", "--save-optimized",
                                        "{graph}/model.onnx"), "is the input"),
    F("bench-json-over-graph", ("bench", "{graph}/model.onnx", "--json", "{graph}/model.onnx"), "is the input"),
    F("bench-json-is-folder", ("bench", "{graph}/model.onnx", "--json", "{tmp}/empty"), "is a directory", empty_folder),
    F("bench-not-onnx", ("bench", "{tmp}/bad.onnx"), "is not a readable ONNX file", bad_graph),
    F("triton-over-model-folder", ("triton", "{graph}/model.onnx", "{tmp}", "--name", "graph", "--force"),
      "contains the input"),
    F("triton-exists", ("triton", "{graph}/model.onnx", "{tmp}/repo"), "already exists", triton_existing),
    F("triton-bad-name", ("triton", "{graph}/model.onnx", "{tmp}/repo", "--name", "../up"), "model name"),
    F("triton-repo-is-file", ("triton", "{graph}/model.onnx", "{tmp}/afile"), "is not a folder", parent_file),
    F("compare-not-a-report", ("compare", "{tmp}/report.json", "{tmp}/report.json"), "is not a report", report_json),
    F("compare-missing", ("compare", "{tmp}/none.json", "{tmp}/none.json"), "no such file"),
]


@pytest.fixture
def ctx(tiny_dirs, exported, tmp_path) -> Ctx:
    context = Ctx(tmp_path, tmp_path / "model", tmp_path / "graph", tmp_path / "switch")
    shutil.copytree(tiny_dirs["mixtral"], context.model)
    shutil.copytree(exported, context.graph)
    shutil.copytree(tiny_dirs["switch_transformers"], context.switch)
    return context


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_is_one_line_and_harmless(case: Fault, ctx: Ctx, capsys):
    if case.setup is not None:
        case.setup(ctx)
    inputs = (ctx.model, ctx.graph, ctx.switch, *(p for p in (ctx.tmp / "elsewhere",) if p.exists()))
    before = tree_digest(*inputs)
    command, *rest = [ctx.fmt(arg) for arg in case.argv]
    # the fast settings first: a case's own flag comes later and wins
    argv = [command, *{"compress": FAST, "export": ["--quiet", "--no-validate"]}.get(command, []), *rest]
    assert main(argv) != 0
    one_error_line(capsys.readouterr().err, case.message)
    assert tree_digest(*inputs) == before
    assert not debris(ctx.tmp)
    assert not (ctx.tmp / "repo" / "model" / "1").exists()  # triton linked or copied nothing


# ---- killed, interrupted and terminated mid-write (the console scripts in a subprocess) --------------

# Loaded at start-up by the subprocess (sitecustomize on PYTHONPATH): the first staging folder about to be
# swapped in writes its path to the marker file and waits, so the test signals a writer caught mid-write.
PAUSE_HOOK = '''
import os
import time
from pathlib import Path

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
