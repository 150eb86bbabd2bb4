"""Mistakes a new user makes with the fxpipe CLI and API, found by trying them end to end.

Each test is a regression test of one fix: before it, the mistake gave a deep traceback
(from pathlib, matplotlib, torch), a misleading message, or a silently wrong result. Now it
is a typed fxpipe error (CLI: one line on stderr, exit status 2) naming what, where and the fix.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fxpipe
from fxpipe.cli import main
from fxpipe.errors import FxpipeError, PlanError, RuntimeMismatchError

__all__: list[str] = []

FACTORY = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(8, 16)
'''

CLUSTER = {"devices": [{"name": f"gpu{i}", "kind": "cuda", "peak_flops": 6.7e13, "mem_bandwidth": 3.35e12,
                        "memory": 8.5e10} for i in range(2)]}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("factory") / "mymodel.py"
    path.write_text(FACTORY)
    return path


@pytest.fixture(scope="module")
def plan_file(factory: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", f"{factory}:make", "--devices", "cpu,cpu", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cm() -> fxpipe.CompiledModel:
    torch.manual_seed(0)
    return fxpipe.compile(_mlp(), ["cpu", "cpu"], (torch.randn(8, 16),), microbatches=4)


def _clean_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI; assert exit status 2 and a one-line error without a traceback; return it."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fxpipe: error: "), err
    return last


# ---- CLI: output paths that are folders ---------------------------------------------------
def test_plan_output_that_is_a_folder(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: ValueError "PosixPath('.') has an empty name" from pathlib, after planning
    msg = _clean_error(["plan", f"{factory}:make", "--devices", "cpu,cpu", "-o", str(tmp_path)], capsys)
    assert "is a folder" in msg and "plan.json" in msg
    assert list(tmp_path.iterdir()) == []  # no stray .tmp file


def test_plan_save_to_a_folder_is_a_plan_error(plan_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = fxpipe.Plan.load(plan_file)
    monkeypatch.chdir(tmp_path)
    for where in (".", tmp_path):
        with pytest.raises(PlanError, match="is a folder"):
            plan.save(where)
    assert list(tmp_path.iterdir()) == []


def test_inspect_png_to_a_folder(plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: IsADirectoryError traceback from matplotlib's savefig
    msg = _clean_error(["inspect", str(plan_file), "--format", "png", "-o", str(tmp_path)], capsys)
    assert "is a folder" in msg


def test_inspect_png_under_a_file(plan_file: Path, capsys: pytest.CaptureFixture) -> None:
    # a file where the output's folder should be: OSError from mkdir, was a traceback
    msg = _clean_error(["inspect", str(plan_file), "--format", "png", "-o", str(plan_file / "x.png")], capsys)
    assert str(plan_file) in msg


# ---- CLI: profile with a cluster file of devices that are not here ------------------------
def test_profile_with_a_cluster_of_absent_gpus(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: RuntimeError "Invalid device string: 'gpu0'" traceback from torch.device
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps(CLUSTER))
    msg = _clean_error(["profile", f"{factory}:make", "--cluster", str(cluster), "-o", str(tmp_path / "p.json")], capsys)
    # refused before the model is built; points at `fxpipe plan`, which plans such clusters
    assert "'gpu0'" in msg and "use `fxpipe plan`" in msg
    assert not (tmp_path / "p.json").exists()


# ---- planning: interleaved with more virtual stages than units ----------------------------
def test_too_many_virtual_stages_names_virtual_stages(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: "the model has 5 units but 6 devices were given" with 2 devices given
    msg = _clean_error(["plan", f"{factory}:make", "--devices", "cpu,cpu", "--schedule", "interleaved",
                        "--virtual-stages", "3", "-o", str(tmp_path / "p.json")], capsys)
    assert "6 stages" in msg and "3 virtual stages on each of 2 devices" in msg and "at most 2" in msg
    assert "devices were given" not in msg


def test_compile_from_plan_refuses_other_virtual_stages(plan_file: Path) -> None:
    # was: virtual_stages=2 silently ignored when the plan (1f1b) has one stage per device
    with pytest.raises(PlanError, match="virtual_stages=2"):
        fxpipe.compile(_mlp(), example_inputs=(torch.randn(8, 16),), plan=plan_file, virtual_stages=2)
    cm = fxpipe.compile(_mlp(), example_inputs=(torch.randn(8, 16),), plan=plan_file, virtual_stages=1)
    assert cm.plan.num_stages == 2


# ---- API: train/eval mode changed after an export capture ---------------------------------
def test_eval_after_compiling_in_train_mode_is_refused_with_export() -> None:
    # was: export baked dropout into the graph, so after model.eval() cm(x) still dropped
    # activations: a silently wrong result (differed from model(x) by ~1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 4)).train()
    x = torch.randn(8, 16)
    cm = fxpipe.compile(model, ["cpu", "cpu"], (x,), microbatches=2, capture_method="export")
    model.eval()
    with pytest.raises(RuntimeMismatchError, match="eval mode but was in train mode"):
        cm(x)
    with pytest.raises(RuntimeMismatchError, match="model.train()"):
        cm.step(x, target=torch.randn(8, 4), loss_fn=nn.functional.mse_loss)
    model.train()  # back to the compiled mode: runs again
    assert cm(x).shape == (8, 4)


def test_eval_compiled_model_equals_eager_and_fx_follows_mode() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 4)).eval()
    cm = fxpipe.compile(model, ["cpu", "cpu"], (x,), microbatches=2, capture_method="export")
    torch.testing.assert_close(cm(x), model(x))
    # fx calls nn.Dropout as a module, which follows its current mode: no refusal there
    fx_model = copy.deepcopy(model).train()
    cm_fx = fxpipe.compile(fx_model, ["cpu", "cpu"], (x,), microbatches=2, capture_method="fx")
    fx_model.eval()
    torch.testing.assert_close(cm_fx(x), fx_model(x))


# ---- API: small mistakes ------------------------------------------------------------------
def test_loss_fn_given_as_a_class(cm: fxpipe.CompiledModel) -> None:
    # was: "loss_fn CrossEntropyLoss raised RuntimeError: Boolean value of Tensor ..."
    x, t = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with pytest.raises(RuntimeMismatchError, match=r"class CrossEntropyLoss.*CrossEntropyLoss\(\)"):
        cm.step(x, target=t, loss_fn=nn.CrossEntropyLoss)
    assert torch.isfinite(cm.step(x, target=t, loss_fn=nn.CrossEntropyLoss()))
    cm.zero_grad()


def test_empty_batch(cm: fxpipe.CompiledModel) -> None:
    # was: "... use microbatches <= 0 or a larger batch"
    with pytest.raises(PlanError, match="the batch is empty") as e:
        cm(torch.randn(0, 16))
    assert "<= 0" not in str(e.value)


def test_stage_code_and_code_out_of_range(cm: fxpipe.CompiledModel) -> None:
    # was: IndexError for stage 5, and stage -1 silently gave the last stage; code("0") a TypeError
    assert "def forward" in cm.stage_code(1)
    for bad in (2, -1):
        with pytest.raises(PlanError, match=f"stage {bad} does not exist; this plan has stages 0..1"):
            cm.stage_code(bad)
    with pytest.raises(PlanError, match="device '0' does not exist"):
        cm.code("0")  # type: ignore[arg-type]


def test_save_checkpoint_onto_a_file(cm: fxpipe.CompiledModel, tmp_path: Path) -> None:
    # was: FileExistsError traceback from pathlib's mkdir
    f = tmp_path / "weights.pt"
    f.write_text("keep me")
    with pytest.raises(FxpipeError, match="checkpoint is a folder"):
        cm.save_checkpoint(f)
    assert f.read_text() == "keep me"


def test_step_trace_path_checked_before_the_step(cm: fxpipe.CompiledModel, tmp_path: Path) -> None:
    # was: the step ran and added into .grad, then writing the trace failed with an error, so
    # a user retrying the "failed" step doubled the gradients; trace=True was a TypeError
    x, t = torch.randn(8, 16), torch.randint(0, 4, (8,))
    cm.zero_grad()
    for bad, words in ((tmp_path / "missing" / "run.json", "does not exist"), (tmp_path, "is a folder"),
                       (True, "must be a file path")):
        with pytest.raises(FxpipeError, match=words):
            cm.step(x, target=t, loss_fn=nn.functional.cross_entropy, trace=bad)
        assert all(q.grad is None for q in cm.parameters()), f"trace={bad!r} changed .grad"
    cm.step(x, target=t, loss_fn=nn.functional.cross_entropy, trace=tmp_path / "run.json")
    assert "traceEvents" in json.loads((tmp_path / "run.json").read_text())
    cm.zero_grad()


class _OptionalAdd(nn.Module):
    """fx traces `b is not None` on a proxy as true and bakes the default None into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.l, self.m = nn.Linear(16, 4), nn.Linear(4, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        y = self.l(a)
        if b is not None:
            y = y + b
        return self.m(y)


def test_capture_falling_back_to_export_prints_no_traceback(capfd: pytest.CaptureFixture) -> None:
    # was: fx's GraphModule wrapper printed a "Traceback ... <--- HERE" of its generated code to
    # stderr during the capture check, although the capture then succeeded with export
    model, x = _OptionalAdd(), torch.randn(8, 16)
    cm = fxpipe.compile(model, ["cpu", "cpu"], (x,), microbatches=2)
    err = capfd.readouterr().err
    assert cm.plan.capture_path == "export"
    assert "Traceback" not in err and "HERE" not in err, err
    torch.testing.assert_close(cm(x), model(x))


# ---- CLI: outputs that would overwrite the inputs -----------------------------------------
def test_plan_output_onto_the_model_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: `fxpipe plan mymodel.py:make -o mymodel.py` replaced the user's source with the plan
    model_file = tmp_path / "mymodel.py"
    model_file.write_text(FACTORY)
    msg = _clean_error(["plan", f"{model_file}:make", "--devices", "cpu,cpu", "-o", str(model_file)], capsys)
    assert "is the model file itself" in msg
    assert model_file.read_text() == FACTORY


@pytest.mark.parametrize("fmt", ["text", "trace", "code", "png"])
def test_inspect_output_onto_the_plan_file(fmt: str, plan_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    # was: `fxpipe inspect plan.json -o plan.json` replaced the plan with its own rendering
    copy_ = tmp_path / "plan.json"
    copy_.write_text(plan_file.read_text())
    msg = _clean_error(["inspect", str(copy_), "--format", fmt, "-o", str(tmp_path / "." / "plan.json")], capsys)
    assert "is the plan file being inspected" in msg
    assert fxpipe.Plan.load(copy_) == fxpipe.Plan.load(plan_file)


# ---- CLI: model files that read the command line or exit ----------------------------------
ARGPARSE_FACTORY = FACTORY + '''
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=1e-3)
args = parser.parse_args()  # at import time, not under `if __name__ == "__main__":`
'''


def test_model_file_with_top_level_argparse(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: the file's parser read fxpipe's argv, printed "unrecognized arguments: plan ..." and
    # exited; now the file sees no arguments, as when it is run on its own
    model_file = tmp_path / "train.py"
    model_file.write_text(ARGPARSE_FACTORY)
    out = tmp_path / "plan.json"
    assert main(["plan", f"{model_file}:make", "--devices", "cpu,cpu", "-o", str(out)]) == 0
    capsys.readouterr()
    assert fxpipe.Plan.load(out).num_stages == 2


def test_model_file_that_exits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: SystemExit is no Exception: fxpipe ended with the user's exit status and no explanation
    model_file = tmp_path / "exits.py"
    model_file.write_text("import sys\n\ndef make():\n    sys.exit('no weights here')\n")
    msg = _clean_error(["plan", f"{model_file}:make", "--devices", "cpu,cpu", "-o", str(tmp_path / "p.json")], capsys)
    assert "make() exited (SystemExit: no weights here)" in msg and "__main__" in msg
    model_file.write_text("import sys\nsys.exit(3)\n")
    msg = _clean_error(["plan", f"{model_file}:make", "--devices", "cpu,cpu", "-o", str(tmp_path / "p.json")], capsys)
    assert "exited (SystemExit: 3) while being imported" in msg


def test_model_spec_without_py_or_naming_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: "model file X does not exist" for both, although the folder exists / X.py exists
    (tmp_path / "mymodel.py").write_text(FACTORY)
    out = str(tmp_path / "p.json")
    msg = _clean_error(["plan", f"{tmp_path / 'mymodel'}:make", "--devices", "cpu,cpu", "-o", out], capsys)
    assert f"did you mean {tmp_path / 'mymodel'}.py:make?" in msg
    msg = _clean_error(["plan", f"{tmp_path}:make", "--devices", "cpu,cpu", "-o", out], capsys)
    assert "is a folder" in msg


def test_plan_help_examples_run_on_the_help_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    # was: the help's example model had 3 units, so its own `--devices 'cpu*4'` examples failed
    import shlex
    import textwrap

    from fxpipe.cli import _PLAN_EPILOG

    code = _PLAN_EPILOG.split("mymodel.py:\n", 1)[1].split("\nexamples:", 1)[0]
    (tmp_path / "mymodel.py").write_text(textwrap.dedent(code))
    monkeypatch.chdir(tmp_path)
    lines = [ln.split("#")[0].strip() for ln in _PLAN_EPILOG.splitlines() if ln.strip().startswith("fxpipe plan ")]
    runnable = [ln for ln in lines if "cuda" not in ln and "--cluster" not in ln]
    assert len(runnable) >= 3
    for ln in runnable:
        rc = main(shlex.split(ln)[1:])
        err = capsys.readouterr().err
        assert rc == 0, f"{ln}: {err.strip().splitlines()[-1]}"


def test_plan_file_given_as_cluster_file(plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: "expected an object with a 'devices' list ..., got dict": reads as if a dict were wrong
    msg = _clean_error(["plan", "x.py:make", "--cluster", str(plan_file), "-o", str(tmp_path / "p.json")], capsys)
    assert "is a plan file, not a cluster file" in msg
    typo = tmp_path / "cluster.json"
    typo.write_text(json.dumps({"device": CLUSTER["devices"]}))
    with pytest.raises(PlanError, match=r"got an object with fields \['device'\]"):
        fxpipe.Cluster.load(typo)


def test_fxpipe_dump_pointing_at_a_file(factory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    # was: FileExistsError traceback from pathlib's mkdir
    monkeypatch.setenv("FXPIPE_DUMP", str(factory))
    msg = _clean_error(["plan", f"{factory}:make", "--devices", "cpu,cpu", "-o", str(tmp_path / "p.json")], capsys)
    assert "FXPIPE_DUMP=" in msg and "unset it" in msg
    assert factory.read_text() == FACTORY


def test_compile_on_devices_of_no_machine_is_refused_before_planning(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU presets and 'meta' are for fxpipe.plan: compile refuses them before the (possibly
    minutes-long) planning, not after."""
    import fxpipe.compiler.pipeline as pipeline

    def no_planning(*a, **k):
        raise AssertionError("planned before refusing")

    monkeypatch.setattr(pipeline, "capture", no_planning)
    m = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    for devices, fragment in ((["h100"] * 2, "'h100:0', kind cuda) is not a torch device"),
                              (["meta", "meta"], "is a 'meta' device")):
        with pytest.raises(PlanError, match=re.escape(fragment)):
            fxpipe.compile(m, devices, torch.randn(4, 8))
