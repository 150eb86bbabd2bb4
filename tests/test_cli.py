"""End-to-end tests of the `fxpipe` command line (fxpipe.cli.main in-process, and one subprocess).

Covers `plan` (factory file -> plan.json), `inspect` (text, trace, code), the clean errors
(exit status 2, one message, no traceback, no file left behind) and `demo` on the built-in
model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fxpipe
from fxpipe.cli import CliError, main, parse_devices

__all__: list[str] = []

ROOT = Path(__file__).resolve().parent.parent

FACTORY = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(4)]
    return nn.Sequential(*blocks, nn.Linear(32, 8)), torch.randn(16, 32)


def make_kwargs():
    model, x = make()
    return model, (), {"input": x}


def not_a_pair():
    return 3


def not_a_model():
    return "model", torch.randn(4, 4)


def bad_args():
    model, x = make()
    return model, [x]


def raises():
    raise RuntimeError("weights not found")
'''


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("factory") / "small_model.py"
    path.write_text(FACTORY)
    return path


@pytest.fixture(scope="module")
def plan_file(factory: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", f"{factory}:make", "--devices", "cpu*2", "--microbatches", "2", "-o", str(out)]) == 0
    return out


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---- plan ---------------------------------------------------------------------------------
def test_plan_writes_a_loadable_plan(plan_file: Path) -> None:
    plan = fxpipe.Plan.load(plan_file)
    assert plan.num_stages == 2
    assert plan.microbatches == 2
    assert plan.schedule.kind == "1f1b" and plan.train
    assert [d.name for d in plan.cluster.devices] == ["cpu", "cpu"]


def test_plan_prints_summary_and_progress(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "g.json"
    rc, stdout, stderr = run(["plan", f"{factory}:make", "--devices", "cpu,cpu,cpu", "--schedule", "gpipe",
                              "--optimizer", "sgd", "-m", "4", "-o", str(out)], capsys)
    assert rc == 0, stderr
    assert "3 stages" in stdout and "schedule gpipe" in stdout
    assert f"wrote {out}" in stdout
    assert "planning time:" in stdout and "capture" in stdout.split("planning time:")[1]
    assert "fxpipe: capture" in stderr and "fxpipe: partition" in stderr
    plan = fxpipe.Plan.load(out)
    assert (plan.num_stages, plan.microbatches, plan.schedule.kind, plan.optimizer) == (3, 4, "gpipe", "sgd")


def test_profile_measures_units_and_saves_a_measured_plan(factory: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.json"
    rc, stdout, stderr = run(["profile", f"{factory}:make", "--devices", "cpu,cpu", "-m", "2", "-o", str(out)], capsys)
    assert rc == 0, stderr
    assert "fxpipe: profile" in stderr
    plan = fxpipe.Plan.load(out)
    assert plan.predicted["cost_source"] == "measured"
    fwd = plan.predicted["measured_costs"]["fwd_s"]
    (times,) = fwd.values()  # one device kind: cpu
    assert len(times) == len(plan.costs.unit_names) and all(t > 0 for t in times)
    # one table row per unit, its measured forward time printed in ms, and the totals line
    rows = [line.split() for line in stdout.splitlines() if line.strip().split(" ")[0] in plan.costs.unit_names]
    assert len(rows) == len(plan.costs.unit_names)
    assert [float(r[1]) for r in rows] == pytest.approx([t * 1e3 for t in times], abs=1e-3)
    assert "measured / model: fwd" in stdout


def test_plan_kwargs_factory_inference_and_cluster_file(factory: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    gpu = {"kind": "cuda", "peak_flops": 6.7e13, "mem_bandwidth": 3.35e12, "memory": 8.0e10}
    cluster = {"devices": [{"name": f"gpu{i}", **gpu} for i in range(2)],
               "links": [{"src": 0, "dst": 1, "bandwidth": 4.5e11, "latency": 1e-5}]}
    (tmp_path / "cluster.json").write_text(json.dumps(cluster))
    out = tmp_path / "inf.json"
    rc, stdout, stderr = run(["plan", f"{factory}:make_kwargs", "--cluster", str(tmp_path / "cluster.json"),
                              "--inference", "-o", str(out)], capsys)
    assert rc == 0, stderr
    plan = fxpipe.Plan.load(out)
    assert not plan.train and plan.num_stages == 2
    assert [d.name for d in plan.cluster.devices] == ["gpu0", "gpu1"]


def test_parse_devices() -> None:
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices("cpu*3") == ["cpu"] * 3
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:0*2,cpu") == ["cuda:0", "cuda:0", "cpu"]
    for bad in ("", "cpu,,cpu", "cpu*0", "cpu*x", "*2"):
        with pytest.raises(CliError):
            parse_devices(bad)


# ---- inspect ------------------------------------------------------------------------------
def test_inspect_text_has_stage_table_and_device_rows(plan_file: Path, capsys: pytest.CaptureFixture) -> None:
    rc, stdout, stderr = run(["inspect", str(plan_file)], capsys)
    assert rc == 0, stderr
    assert "stage  device" in stdout and "fwd ms" in stdout  # the stage table
    assert "predicted timeline" in stdout
    for d in range(2):
        assert f"d{d} cpu |" in stdout
    assert "bubble:" in stdout


def test_inspect_trace_writes_chrome_json(plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, stdout, _ = run(["inspect", str(plan_file), "--format", "trace"], capsys)
    assert rc == 0
    default = plan_file.with_name("plan.trace.json")
    assert default.is_file() and str(default) in stdout
    out = tmp_path / "t.json"
    assert main(["inspect", str(plan_file), "-f", "trace", "-o", str(out)]) == 0
    trace = json.loads(out.read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert events and {e["pid"] for e in events} == {0, 1}
    assert any(e["cat"] == "forward" for e in events) and any(e["cat"] == "backward" for e in events)


def test_inspect_code_shows_every_device_program(plan_file: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    rc, stdout, _ = run(["inspect", str(plan_file), "--format", "code"], capsys)
    assert rc == 0
    assert "def device_0(rt):" in stdout and "def device_1(rt):" in stdout
    assert "rt.forward(0, 0)" in stdout
    compile(stdout, "<programs>", "exec")  # it is Python
    out = tmp_path / "code.py"
    assert main(["inspect", str(plan_file), "-f", "code", "-o", str(out)]) == 0
    assert out.read_text().strip() == stdout.strip()


# ---- errors -------------------------------------------------------------------------------
def assert_clean_error(rc: int, stderr: str, *words: str) -> None:
    assert rc == 2
    assert "fxpipe: error:" in stderr
    assert "Traceback" not in stderr
    for w in words:
        assert w in stderr, f"{w!r} not in {stderr!r}"


@pytest.mark.parametrize("spec, words", [
    ("{dir}/missing.py:make", ["missing.py", "does not exist"]),
    ("{file}", ["FILE.py:FACTORY"]),
    ("{file}:nope", ["no function 'nope'", "make"]),
    ("{file}:not_a_pair", ["not_a_pair()", "returned int", "(model, example_args)"]),
    ("{file}:not_a_model", ["torch.nn.Module"]),
    ("{file}:bad_args", ["example_args", "list"]),
    ("{file}:raises", ["RuntimeError", "weights not found"]),
])
def test_plan_errors_are_clean(spec: str, words: list[str], factory: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.json"
    model = spec.format(dir=factory.parent, file=factory)
    rc, _, stderr = run(["plan", model, "--devices", "cpu,cpu", "-o", str(out)], capsys)
    assert_clean_error(rc, stderr, *words)
    assert list(tmp_path.iterdir()) == []  # no plan (or temporary) file left behind


def test_plan_option_errors_are_clean(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.json"
    rc, _, stderr = run(["plan", f"{factory}:make", "--devices", "cpu*two", "-o", str(out)], capsys)
    assert_clean_error(rc, stderr, "cpu*two")
    rc, _, stderr = run(["plan", f"{factory}:make", "--devices", "cpu,cpu", "-m", "64", "-o", str(out)], capsys)
    assert_clean_error(rc, stderr, "64 microbatches")
    rc, _, stderr = run(["plan", f"{factory}:make", "--cluster", str(tmp_path / "none.json"), "-o", str(out)], capsys)
    assert_clean_error(rc, stderr, "none.json")
    rc, _, stderr = run(["plan", f"{factory}:make", "-o", str(out)], capsys)  # neither --devices nor --cluster
    assert rc == 2 and "--devices" in stderr
    assert list(tmp_path.iterdir()) == []


def test_inspect_truncated_plan(plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "cut.json"
    text = plan_file.read_text()
    bad.write_text(text[: len(text) // 2])
    rc, _, stderr = run(["inspect", str(bad)], capsys)
    assert_clean_error(rc, stderr, "cut.json", "not valid JSON")


def test_inspect_unknown_version(plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = json.loads(plan_file.read_text())
    data["version"] = 999
    bad = tmp_path / "future.json"
    bad.write_text(json.dumps(data))
    for fmt in ("text", "trace", "code"):
        rc, _, stderr = run(["inspect", str(bad), "--format", fmt], capsys)
        assert_clean_error(rc, stderr, "version 999")
    assert not (tmp_path / "future.trace.json").exists()


@pytest.mark.parametrize("damage", [
    lambda d: d["stages"][0].update(fwd_ms="fast"),
    lambda d: d["stages"][0].update(device=None),
    lambda d: d["predicted"].pop("step_ms"),
    lambda d: d.pop("schedule"),
    lambda d: d.update(format="something-else"),
])
def test_inspect_damaged_plan(damage, plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = json.loads(plan_file.read_text())
    damage(data)
    bad = tmp_path / "damaged.json"
    bad.write_text(json.dumps(data))
    rc, _, stderr = run(["inspect", str(bad)], capsys)
    assert_clean_error(rc, stderr, "damaged.json")


def test_inspect_missing_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, stderr = run(["inspect", str(tmp_path / "nope.json")], capsys)
    assert_clean_error(rc, stderr, "nope.json", "does not exist")


# ---- help, demo ---------------------------------------------------------------------------
def test_help_and_version_in_process(capsys: pytest.CaptureFixture) -> None:
    for sub in ("plan", "inspect", "demo"):
        rc, stdout, _ = run([sub, "--help"], capsys)
        assert rc == 0 and "examples:" in stdout and f"fxpipe {sub}" in stdout
    rc, stdout, _ = run(["--version"], capsys)
    assert rc == 0 and fxpipe.__version__ in stdout
    rc, _, _ = run([], capsys)
    assert rc == 2


def test_module_help_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "fxpipe", "--help"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("plan", "inspect", "demo", "examples:"):
        assert word in r.stdout


def test_demo_builtin_passes(capsys: pytest.CaptureFixture) -> None:
    rc, stdout, stderr = run(["demo", "--model", "builtin", "--steps", "2", "--microbatches", "4"], capsys)
    assert rc == 0, stdout + stderr
    assert "TinyGPT" in stdout
    assert "PASS" in stdout and "FAIL" not in stdout
    assert "step 2: loss" in stdout
    assert "d0 cpu |" in stdout and "d1 cpu |" in stdout
    assert "def device_0(rt):" in stdout
