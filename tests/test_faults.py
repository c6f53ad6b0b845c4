"""What a careless or hostile user can do to the CLI, and what must follow (issue 11).

Every fault: a non-zero exit, one stderr line naming the problem, no traceback, the inputs
byte for byte as before, and no debris (no `.NAME.staging-*` / `.NAME.old-*` folder) left.
This file: bad outputs, bad inputs, untrusted graphs (one table). test_fault_writes.py:
processes killed mid-write (SIGKILL, SIGTERM, SIGINT, through the console scripts), stale
staging folders of killed runs, a full disk. test_input_checks.py: lying configs and
safetensors headers, calibration text, contradictory options, devices.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from mcsmoe_deploy.cli import main
from mcsmoe_deploy.contract import external_data_path

from fault_helpers import FAST, debris, one_error_line, tree_digest


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
    # demo: the quantized row's block size, checked before the long work
    F("demo-quant-block-not-power-of-two", ("demo", "--quant-block", "48", "--no-serve"),
      "--quant-block must be a power of two >= 16, not 48"),
    F("demo-quant-block-not-dividing", ("demo", "--quant-block", "32", "--no-serve"),
      "--quant-block 32 does not divide the input size 144 of the down projection; 16 divides"),
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
