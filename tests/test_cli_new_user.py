"""The command line as a new user meets it: mistakes caught before the model is built, factories
of the shapes the README allows, wrong example inputs, Ctrl-C, and the hints in the summary.

Each test drives `fxpipe.cli.main` in-process and asserts on the exit status, the one error line
and what was (not) run or written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxpipe
from fxpipe.cli import main

__all__: list[str] = []

ROOT = Path(__file__).resolve().parent.parent

FACTORY = '''
import torch
from torch import nn

CALLS = []


def _model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(3)])


def make():
    CALLS.append("make")
    return _model(), torch.randn(8, 16)


def expensive():
    # stands for a model that takes minutes to build: a bad option must be refused before it
    raise RuntimeError("built the model")


def only_model():
    return _model()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _model()

    def forward(self, x):
        return self.body(x)


def kwargs_dict():
    return Net(), {"x": torch.randn(8, 16)}


def wrong_width():
    return _model(), torch.randn(8, 17)


def interrupted():
    raise KeyboardInterrupt
'''


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("factory") / "newuser_model.py"
    path.write_text(FACTORY)
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error(rc: int, stderr: str) -> str:
    """The single 'fxpipe: error:' line of a clean failure (exit 2, no traceback)."""
    assert rc == 2, stderr
    assert "Traceback" not in stderr and "While executing" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("fxpipe: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# ---- mistakes refused before the model is built ----------------------------------------------
@pytest.mark.parametrize("options, words", [
    (["--devices", "CPU,CPU"], ["unknown device 'CPU'"]),
    (["--devices", "gpu*2"], ["unknown device 'gpu'"]),
    (["--devices", "cuda:x"], ["'cuda:x'"]),
    (["--devices", "cpu,cpu", "--virtual-stages", "3"], ["virtual_stages=3", "interleaved"]),
    (["--devices", "cpu,cpu", "--schedule", "auto", "--virtual-stages", "2"], ["--virtual-stages", "--schedule auto"]),
    (["--devices", "cpu,cpu", "--schedule", "zb-h1", "--recompute", "on"], ["zb-h1"]),
    (["--devices", "cpu,cpu", "--inference", "--recompute", "on"], ["recompute"]),
])
def test_bad_options_are_refused_before_building_the_model(options: list[str], words: list[str], factory: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, stderr = run(["plan", f"{factory}:expensive", *options, "-o", str(tmp_path / "p.json")], capsys)
    line = one_error(rc, stderr)
    assert "built the model" not in stderr and "building the model" not in stderr
    for w in words:
        assert w in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_cuda_without_gpus_points_at_presets(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, stderr = run(["plan", f"{factory}:expensive", "--devices", "cuda,cuda", "-o", str(tmp_path / "p.json")],
                        capsys)
    line = one_error(rc, stderr)
    assert "CUDA is not available" in line and "--devices 'h100*2'" in line
    assert "built the model" not in stderr


def test_profile_refuses_presets_before_building(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, stderr = run(["profile", f"{factory}:expensive", "--devices", "h100*2", "-o", str(tmp_path / "p.json")],
                        capsys)
    line = one_error(rc, stderr)
    assert "'h100:0'" in line and "fxpipe plan" in line
    assert "built the model" not in stderr


# ---- factories ------------------------------------------------------------------------------
def test_factory_returning_only_the_model(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("only_model", "Net"):  # a function that forgot the inputs, or the class itself
        rc, _, stderr = run(["plan", f"{factory}:{name}", "--devices", "cpu,cpu", "-o", str(tmp_path / "p.json")],
                            capsys)
        line = one_error(rc, stderr)
        assert "returned only a model" in line and "example" in line, line


def test_factory_may_return_a_dict_of_keyword_arguments(factory: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    # the README: example inputs are "a tensor, a tuple of positional arguments or a dict of keyword arguments"
    out = tmp_path / "kw.json"
    rc, _, stderr = run(["plan", f"{factory}:kwargs_dict", "--devices", "cpu,cpu", "-m", "2", "-o", str(out)], capsys)
    assert rc == 0, stderr
    plan = fxpipe.Plan.load(out)
    assert plan.batch_size == 8 and plan.microbatches == 2 and plan.num_stages == 2


# ---- Ctrl-C ---------------------------------------------------------------------------------
def test_interrupt_ends_the_progress_line_first(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, stderr = run(["plan", f"{factory}:interrupted", "--devices", "cpu,cpu", "-o", str(tmp_path / "p.json")],
                        capsys)
    assert rc == 130
    assert "Traceback" not in stderr
    assert "fxpipe: error: interrupted" in stderr.splitlines(), stderr  # on a line of its own
    assert list(tmp_path.iterdir()) == []


# ---- example inputs that do not fit the model -----------------------------------------------
def test_inputs_of_the_wrong_shape_say_so_in_one_message(factory: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    # Linear(16, ..) fed 17 features: fx traces it, shape propagation is the first to run it
    rc, _, stderr = run(["plan", f"{factory}:wrong_width", "--devices", "cpu,cpu", "-o", str(tmp_path / "p.json")],
                        capsys)
    one_error(rc, stderr)
    assert "shape propagation failed" in stderr and "17" in stderr
    assert "example inputs fit the model" in stderr
    assert "nonzero" not in stderr  # the data-dependent-op hint does not apply to a shape mismatch
    assert "tlparse" not in stderr and "Original traceback" not in stderr


# ---- hints ----------------------------------------------------------------------------------
def test_too_few_microbatches_get_a_hint(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.json"
    rc, stdout, stderr = run(["plan", f"{factory}:make", "--devices", "cpu*4", "-m", "1", "-o", str(out)], capsys)
    assert rc == 0, stderr
    bubble = fxpipe.Plan.load(out).predicted["bubble"]
    assert bubble >= 0.5  # one microbatch through 4 stages: each device works a quarter of the step
    (hint,) = [line for line in stdout.splitlines() if line.startswith("hint:")]
    assert f"idle {bubble:.0%}" in hint and "1 microbatch does not" in hint and "--microbatches auto" in hint
    # enough microbatches: no hint
    rc, stdout, stderr = run(["plan", f"{factory}:make", "--devices", "cpu*2", "-m", "8", "-o", str(out)], capsys)
    assert rc == 0, stderr
    assert fxpipe.Plan.load(out).predicted["bubble"] < 0.5 and "hint:" not in stdout


# ---- start-up -------------------------------------------------------------------------------
def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)


def test_help_does_not_import_torch(tmp_path: Path) -> None:
    # `fxpipe --help` answered in a fraction of a second, not after torch's multi-second import
    r = _python("import sys\nfrom fxpipe.cli import main\nrc = main(['plan', '--help'])\n"
                "print('torch imported:', 'torch' in sys.modules)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "examples:" in r.stdout and "torch imported: False" in r.stdout


def test_ctrl_c_while_torch_imports_is_clean(tmp_path: Path) -> None:
    # Ctrl-C in the first seconds of `python -m fxpipe plan ...` lands in torch's import; made
    # deterministic by an import hook that raises KeyboardInterrupt when torch is imported
    code = """
import runpy, sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["fxpipe", "plan", "m.py:make", "--devices", "cpu,cpu"]
runpy.run_module("fxpipe", run_name="__main__", alter_sys=True)
"""
    r = _python(code, tmp_path)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines() == ["fxpipe: error: interrupted"]


def test_auto_mode_progress_says_what_the_repeated_phases_are(factory: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "auto.json"
    rc, _, stderr = run(["plan", f"{factory}:make", "--devices", "cpu*2", "--schedule", "auto", "-m", "auto",
                         "-o", str(out)], capsys)
    assert rc == 0, stderr
    lines = stderr.splitlines()
    first_candidate = next(i for i, line in enumerate(lines) if line.startswith("fxpipe: auto candidate 1/"))
    intro = next(i for i, line in enumerate(lines) if line.startswith("fxpipe: auto: ") and "candidates;" in line)
    # every "shapes ..." line after the first capture comes after the line that explains them
    shapes = [i for i, line in enumerate(lines) if line.startswith("fxpipe: shapes")]
    assert len(shapes) > 1 and intro < shapes[1] and intro < first_candidate
    n = len(fxpipe.Plan.load(out).predicted["auto"])
    assert f"fxpipe: auto: {n} candidates;" in lines[intro]


# ---- inspect --------------------------------------------------------------------------------
def test_trace_rows_are_named_by_device_and_the_count_is_what_was_written(factory: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    import json

    plan = tmp_path / "p.json"
    assert main(["plan", f"{factory}:make", "--devices", "h100*2", "-m", "4", "-o", str(plan)]) == 0
    capsys.readouterr()
    out = tmp_path / "t.json"
    rc, stdout, stderr = run(["inspect", str(plan), "-f", "trace", "-o", str(out)], capsys)
    assert rc == 0, stderr
    events = json.loads(out.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "d0 h100:0", 1: "d1 h100:1"}  # as the rows of the text timeline
    slices = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["pid"] in names and e["tid"] in (0, 1) for e in slices)
    assert f"({len(slices)} slices on 2 devices" in stdout


def test_choices_are_case_insensitive_and_counts_singular(factory: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    # was: "--schedule 1F1B" refused by argparse ("invalid choice") though "H100*2" is accepted,
    # and the summary read "1 microbatches"
    out = tmp_path / "p.json"
    rc, stdout, stderr = run(["plan", f"{factory}:make", "--devices", "cpu*2", "-m", "1", "--schedule", "GPipe",
                              "--recompute", "OFF", "-o", str(out)], capsys)
    assert rc == 0, stderr
    plan = fxpipe.Plan.load(out)
    assert plan.schedule.kind == "gpipe" and plan.microbatches == 1
    assert "2 stages, 1 microbatch of batch" in plan.summary()
