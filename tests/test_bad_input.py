"""Every bad input gets a typed fxpipe error that says what, where and what to do.

One test per case. Each asserts the error type, the key words of the message (the numbers,
the names, the fix), and that nothing is left behind: no `fxpipe-device-*` worker thread
alive (checked after every test by an autouse fixture), no plan or `.tmp` file written, the
model's parameters and `.grad` as they were, and a CompiledModel that still runs a correct
step after a failed one.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpipe
from fxpipe import Cluster, Device, FxpipeError, Plan, PlanError, RuntimeMismatchError, TraceError

__all__: list[str] = []

TOL = dict(rtol=1e-4, atol=1e-6)


# ---- helpers ----------------------------------------------------------------------------------


def _workers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fxpipe-device-") and t.is_alive()]


@pytest.fixture(autouse=True)
def _no_stray_workers():
    """Whatever a test does, no worker thread outlives it."""
    yield
    assert not _workers(), f"worker threads still alive: {_workers()}"


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))


class TiedNet(nn.Module):
    """The first layer's weight is read again by the last stage: a replica with its own .grad."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.mid = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.out = nn.Linear(16, 16)
        self.out.weight = self.inp.weight

    def forward(self, x):
        return self.out(self.mid(self.inp(x)))


def raises(kind: type[FxpipeError], *words: str):
    """pytest.raises for `kind` whose message contains every one of `words` (plain text)."""
    return pytest.raises(kind, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(8, 16)


@pytest.fixture
def cm(x):
    return fxpipe.compile(make_mlp(), ["cpu", "cpu"], example_inputs=(x,), microbatches=4)


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {n: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _assert_unchanged(model: nn.Module, snap) -> None:
    for n, p in model.named_parameters():
        w, g = snap[n]
        assert p.device.type == "cpu" and torch.equal(p.detach(), w), f"{n} changed"
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g)), f"{n}.grad changed"


# ---- capture ----------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # the branch depends on tensor values: neither tracer can follow it
            h = h * 2
        return self.b(h)


def test_data_dependent_control_flow_is_a_trace_error(x):
    line = inspect.getsourcelines(DataDependent.forward)[1] + 2
    with raises(TraceError, "could not capture DataDependent", "fx:", "export:",
                f"{Path(__file__).name}:{line}", "if h.sum() > 0:", "What to try", "torch.where", "leaf_modules"):
        fxpipe.compile(DataDependent(), ["cpu", "cpu"], example_inputs=(x,))


# ---- devices ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_cuda_device_that_does_not_exist(x):
    model = make_mlp()
    snap = _snapshot(model)
    # without CUDA: "CUDA is not available"; with it: "this machine has N CUDA device(s); use cuda:0 .."
    fix = "use cuda:0" if torch.cuda.is_available() else "use 'cpu' devices"
    with raises(PlanError, "'cuda:7' does not exist", fix):
        fxpipe.compile(model, ["cpu", "cuda:7"], example_inputs=(x,))
    _assert_unchanged(model, snap)


def test_unknown_device_kind(x):
    with raises(PlanError, "unknown device 'tpu'", "'cpu'", "'cuda:N'", "fxpipe.Device"):
        fxpipe.compile(make_mlp(), ["tpu"], example_inputs=(x,))


def test_malformed_device_string(x):
    with raises(PlanError, "'cpu:x' is not a valid torch device string", "'cuda:0'"):
        fxpipe.compile(make_mlp(), ["cpu", "cpu:x"], example_inputs=(x,))


def test_empty_device_list(x):
    with raises(PlanError, "devices is empty", "devices=['cpu', 'cpu']"):
        fxpipe.compile(make_mlp(), [], example_inputs=(x,))


def test_devices_not_a_list(x):
    with raises(PlanError, "devices must be a list", "got int 3"):
        fxpipe.plan(make_mlp(), 3, example_inputs=(x,))


def test_compile_without_devices_or_plan(x):
    with raises(PlanError, "compile needs devices", "devices=['cpu', 'cpu']", "plan="):
        fxpipe.compile(make_mlp(), None, example_inputs=(x,))


# ---- memory -----------------------------------------------------------------------------------


def test_model_that_fits_on_no_device_of_a_cluster(x):
    tiny = Device("cpu", "cpu", peak_flops=1e10, mem_bandwidth=1e10, memory=2000)
    model = make_mlp()
    snap = _snapshot(model)
    with raises(PlanError, "fits in memory", "needs", "2000 bytes", "short", "To make it fit", "more memory"):
        fxpipe.compile(model, Cluster((tiny, tiny)), example_inputs=(x,))
    _assert_unchanged(model, snap)


def test_model_that_fits_nowhere_from_devices_with_memory(x):
    with raises(PlanError, "fits in memory", "1000 bytes", "To make it fit"):
        fxpipe.plan(make_mlp(), Cluster.from_devices(["cpu", "cpu"], memory=1000), example_inputs=(x,))


def test_non_positive_memory_override():
    with raises(PlanError, "memory must be a positive number", "-1"):
        Cluster.from_devices(["cpu"], memory=-1)


# ---- microbatches -----------------------------------------------------------------------------


def test_more_microbatches_than_samples():
    with raises(PlanError, "4 microbatches", "batch of 3 samples", "microbatches <= 3"):
        fxpipe.compile(make_mlp(), ["cpu", "cpu"], example_inputs=(torch.randn(3, 16),), microbatches=4)


def test_more_microbatches_than_samples_at_call_time(cm):
    with raises(PlanError, "4 microbatches", "batch of 2 samples", "microbatches <= 2"):
        cm(torch.randn(2, 16))


@pytest.mark.parametrize("m", [0, -2, "4", 2.0, True, None])
def test_microbatches_not_a_positive_int(m, x):
    with raises(PlanError, "microbatches must be a positive integer", "microbatches=4", repr(m), type(m).__name__):
        fxpipe.plan(make_mlp(), ["cpu", "cpu"], example_inputs=(x,), microbatches=m)


# ---- options ----------------------------------------------------------------------------------


def test_unknown_schedule(x):
    for entry in (fxpipe.compile, fxpipe.plan):
        with raises(PlanError, "unknown schedule 'zero-bubble'", "'gpipe'", "'1f1b'"):
            entry(make_mlp(), ["cpu", "cpu"], example_inputs=(x,), schedule="zero-bubble")


def test_unknown_optimizer(x):
    for entry in (fxpipe.compile, fxpipe.plan):
        with raises(PlanError, "unknown optimizer 'lion'", "'adam'", "'sgd'"):
            entry(make_mlp(), ["cpu", "cpu"], example_inputs=(x,), optimizer="lion")


def test_bad_timeout(x):
    with raises(PlanError, "timeout must be a positive number of seconds", "0"):
        fxpipe.compile(make_mlp(), ["cpu"], example_inputs=(x,), timeout=0)


# ---- inputs at call time ----------------------------------------------------------------------


def test_other_feature_size(cm):
    with raises(RuntimeMismatchError, "input 'input'", "shape (8, 17)", "(batch, 16)", "only the batch size may change",
                "recompile"):
        cm(torch.randn(8, 17))
    with raises(RuntimeMismatchError, "shape (8, 17)"):
        cm.step(torch.randn(8, 17), target=torch.randn(8, 8), loss_fn=F.mse_loss)


def test_other_dtype(cm):
    with raises(RuntimeMismatchError, "input 'input'", "torch.float64", "torch.float32", "recompile"):
        cm(torch.randn(8, 16, dtype=torch.float64))


def test_missing_argument(cm):
    with raises(RuntimeMismatchError, "missing a required argument: 'input'", "Sequential.forward",
                "call the compiled model with the arguments example_inputs had"):
        cm()


def test_extra_argument(cm, x):
    with raises(RuntimeMismatchError, "too many positional arguments", "example_inputs"):
        cm(x, x)
    with raises(RuntimeMismatchError, "unexpected keyword argument 'mask'", "example_inputs"):
        cm(x, mask=x)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x, y):
        return self.b(self.a(x) + y)


def test_inputs_disagree_on_batch_size():
    cm = fxpipe.compile(TwoInputs(), ["cpu", "cpu"], example_inputs=(torch.randn(8, 16), torch.randn(8, 16)))
    with raises(RuntimeMismatchError, "disagree on the batch size", "'x': (8, 16)", "'y': (6, 16)", "same batch size"):
        cm(torch.randn(8, 16), torch.randn(6, 16))


def test_bad_calls_leave_the_compiled_model_working(cm, x):
    ref = copy.deepcopy(cm.model)
    for bad in (lambda: cm(torch.randn(8, 17)), lambda: cm(), lambda: cm(x, x)):
        with pytest.raises(RuntimeMismatchError):
            bad()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), ref(x), **TOL)


# ---- target and loss_fn -----------------------------------------------------------------------


def test_target_with_the_wrong_batch_size(cm, x):
    with raises(RuntimeMismatchError, "batch size 8", "shape (7, 8)", "one target per input sample"):
        cm.step(x, target=torch.randn(7, 8), loss_fn=F.mse_loss)
    with raises(RuntimeMismatchError, "batch size 8", "got float"):
        cm.step(x, target=[1.0] * 8, loss_fn=F.mse_loss)  # Python numbers are not split
    # None is passed on (a loss without target); a loss_fn that needs one says target is None
    with raises(RuntimeMismatchError, "loss_fn mse_loss raised", "target is None"):
        cm.step(x, target=None, loss_fn=F.mse_loss)


def test_loss_fn_not_callable(cm, x):
    with raises(RuntimeMismatchError, "loss_fn must be callable", "'mse'", "loss_fn=torch.nn.functional.mse_loss"):
        cm.step(x, target=torch.randn(8, 8), loss_fn="mse")


def _check_step_matches_eager(cm, ref, x, t):
    loss = cm.step(x, target=t, loss_fn=F.mse_loss)
    ref_loss = F.mse_loss(ref(x), t)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **TOL)
    want = dict(ref.named_parameters())
    for name, p in cm.model.named_parameters():
        torch.testing.assert_close(p.grad, want[name].grad, **TOL, msg=lambda m: f"{name}: {m}")
    assert all(not box.items for box in cm._rt.mailboxes)


def test_loss_fn_returning_a_non_scalar(cm, x):
    ref = copy.deepcopy(cm.model)
    t = torch.randn(8, 8)
    snap = _snapshot(cm.model)
    with raises(RuntimeMismatchError, "loss_fn <lambda> returned a tensor of shape (2, 8)", "stage 1", "device 1",
                "F(s1,mb0)", "scalar", ".mean()"):
        cm.step(x, target=t, loss_fn=lambda out, tt: (out - tt) ** 2)
    _assert_unchanged(cm.model, snap)
    _check_step_matches_eager(cm, ref, x, t)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_loss_fn_that_raises_midway_undoes_the_step(schedule):
    """The third microbatch's loss raises after backwards already ran (tied weights, so replicas
    hold gradients too): .grad is restored, and the next steps equal eager exactly."""
    torch.manual_seed(0)
    model = TiedNet()
    ref = copy.deepcopy(model)
    x, t = torch.randn(8, 16), torch.randn(8, 16)
    cm = fxpipe.compile(model, ["cpu"] * 3, example_inputs=(x,), microbatches=4, schedule=schedule)
    assert cm._replicas, "the tied weight must be replicated for this test to mean anything"
    _check_step_matches_eager(cm, ref, x, t)  # .grad now holds one step: a failure must not touch it
    snap = _snapshot(model)
    calls = []

    def flaky(out, tt):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("labels out of range")
        return F.mse_loss(out, tt)

    with raises(RuntimeMismatchError, "loss_fn flaky raised ValueError: labels out of range", "stage 2", "device 2",
                "F(s2,mb2)", "undone", "fix loss_fn") as info:
        cm.step(x, target=t, loss_fn=flaky)
    assert isinstance(info.value.__cause__, ValueError)
    _assert_unchanged(model, snap)
    assert all(rep.grad is None for _, rep in cm._replicas)
    assert cm._rt.state is None and all(not box.items for box in cm._rt.mailboxes)
    _check_step_matches_eager(cm, ref, x, t)  # grads accumulate over the two good steps, as in eager


def test_loss_fn_that_detaches(cm, x):
    with raises(RuntimeMismatchError, "does not require grad", "stage 1", "F(s1,mb0)", "detached"):
        cm.step(x, target=torch.randn(8, 8), loss_fn=lambda out, tt: torch.tensor(F.mse_loss(out, tt).item()))


# ---- plan files -------------------------------------------------------------------------------


@pytest.fixture
def plan_file(tmp_path, x) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "plan.json"
    fxpipe.plan(make_mlp(), ["cpu", "cpu"], example_inputs=(x,)).save(path)
    return path


def test_truncated_plan_file(plan_file):
    text = plan_file.read_text()
    plan_file.write_text(text[: len(text) // 2])
    with raises(PlanError, str(plan_file), "not valid JSON", "truncated", "fxpipe plan"):
        Plan.load(plan_file)


def test_plan_file_for_the_same_model_runs(plan_file, x):
    """The control case of the refusals below: the model the plan was made for compiles from it
    (no re-planning: the plan's stages are used as they are) and computes what eager computes."""
    torch.manual_seed(0)
    model = make_mlp()
    ref = copy.deepcopy(model)
    cm = fxpipe.compile(model, example_inputs=(x,), plan=plan_file, microbatches=4, devices=["cpu", "cpu"])
    assert cm.plan == Plan.load(plan_file)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), ref(x), **TOL)
    _check_step_matches_eager(cm, ref, x, torch.randn(8, 8))


def test_plan_file_for_another_model(plan_file, x):
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 9))
    snap = _snapshot(other)
    plan = Plan.load(plan_file)
    with raises(PlanError, "made for another model", plan.fingerprint[:12], "re-plan this model"):
        fxpipe.compile(other, example_inputs=(x,), plan=str(plan_file))
    _assert_unchanged(other, snap)
    with raises(PlanError, "made for another model"):
        Plan.load(plan_file, fingerprint="0" * 64)


def test_plan_file_from_a_newer_version(plan_file):
    data = json.loads(plan_file.read_text())
    data["version"] = 7
    plan_file.write_text(json.dumps(data))
    with raises(PlanError, "plan format version 7", "reads versions 1..1", "Upgrade fxpipe"):
        Plan.load(plan_file)


def test_plan_file_that_is_not_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("stage 0: cpu\nstage 1: cpu\n")
    # another kind of file, not a damaged plan: no "truncated?" hint
    with raises(PlanError, "is not a JSON file", "'stage 0: cpu"):
        Plan.load(path)
    path.write_text("import torch\n")
    with raises(PlanError, "is not a JSON file", "give the plan file fxpipe wrote"):
        Plan.load(path)
    path.write_bytes(b"\xff\xfe\x00\x01")
    with raises(PlanError, "cannot read plan file", "decode"):
        Plan.load(path)
    with raises(PlanError, "cannot read plan file", "directory"):
        Plan.load(tmp_path)


def test_plan_file_that_is_a_json_list(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("[1, 2, 3]")
    with raises(PlanError, "is not an fxpipe plan file", '"format": "fxpipe-plan"'):
        Plan.load(path)


def test_plan_file_with_a_field_of_the_wrong_type(plan_file):
    data = json.loads(plan_file.read_text())
    data["stages"][1]["fwd_ms"] = "0.5"
    plan_file.write_text(json.dumps(data))
    with raises(PlanError, "is damaged", "'stages[1].fwd_ms'", "finite number >= 0", "'0.5'"):
        Plan.load(plan_file)


def test_plan_and_explicit_settings_that_disagree(plan_file, x):
    with raises(PlanError, "microbatches=4", "microbatches=2", "leave microbatches out"):
        fxpipe.compile(make_mlp(), example_inputs=(x,), plan=plan_file, microbatches=2)
    with raises(PlanError, "devices ['cpu', 'cpu']", "devices=['cpu']", "leave devices out"):
        fxpipe.compile(make_mlp(), ["cpu"], example_inputs=(x,), plan=plan_file)
    with raises(PlanError, "plan must be a fxpipe.Plan or the path of a plan file", "int"):
        fxpipe.compile(make_mlp(), example_inputs=(x,), plan=42)


def test_plan_for_devices_not_on_this_machine(x):
    gpu = Device("gpu0", "cuda", peak_flops=6.7e13, mem_bandwidth=3.35e12, memory=8e10)
    plan = fxpipe.plan(make_mlp(), Cluster((gpu, gpu)), example_inputs=(x,))
    model = make_mlp()
    snap = _snapshot(model)
    with raises(PlanError, "'gpu0'", "can be inspected", "re-plan for this machine's devices"):
        fxpipe.compile(model, example_inputs=(x,), plan=plan)
    _assert_unchanged(model, snap)


def test_inference_plan_cannot_step(x):
    model = make_mlp()
    plan = fxpipe.plan(model, ["cpu", "cpu"], example_inputs=(x,), train=False)
    cm = fxpipe.compile(model, example_inputs=(x,), plan=plan)
    with raises(PlanError, "inference plan", "train=True"):
        cm.step(x, target=torch.randn(8, 8), loss_fn=F.mse_loss)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), **TOL)


def test_failed_save_leaves_no_file(tmp_path, x):
    plan = fxpipe.plan(make_mlp(), ["cpu", "cpu"], example_inputs=(x,))
    with raises(PlanError, "cannot write plan file", "folder exists"):
        plan.save(tmp_path / "missing" / "plan.json")
    with pytest.raises(TypeError):  # a value JSON cannot hold fails before the disk is touched
        plan.with_(timings={"x": object()}).save(tmp_path / "plan.json")
    assert list(tmp_path.iterdir()) == []


def test_failed_replace_keeps_the_old_file(tmp_path, x, monkeypatch):
    plan = fxpipe.plan(make_mlp(), ["cpu", "cpu"], example_inputs=(x,))
    path = tmp_path / "plan.json"
    plan.save(path)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with raises(PlanError, "cannot write plan file", "No space left on device"):
        plan.with_(microbatches=plan.microbatches).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_failed_plan_writes_no_file(tmp_path, x):
    """The CLI path: planning refuses the model, so nothing is saved."""
    from fxpipe.cli import main

    factory = tmp_path / "m.py"
    factory.write_text("import torch\nfrom torch import nn\n\ndef make():\n"
                       "    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), torch.randn(4, 16)\n")
    cluster = tmp_path / "tiny.json"
    cluster.write_text(json.dumps({"devices": [{"name": "g", "kind": "cuda", "peak_flops": 1e12,
                                                "mem_bandwidth": 1e11, "memory": 100}]}))
    assert main(["plan", f"{factory}:make", "--cluster", str(cluster), "-o", str(tmp_path / "p.json")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["m.py", "tiny.json"]


# ---- cluster files ----------------------------------------------------------------------------


GPU = {"name": "gpu0", "kind": "cuda", "peak_flops": 6.7e13, "mem_bandwidth": 3.35e12, "memory": 8e10}


def _load_cluster(tmp_path: Path, data) -> Cluster:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data))
    return Cluster.load(path)


def test_cluster_file_with_a_missing_field(tmp_path):
    dev = {k: v for k, v in GPU.items() if k != "memory"}
    with raises(PlanError, "cluster.json", "devices[0] is missing memory", "required: name, kind"):
        _load_cluster(tmp_path, {"devices": [dev]})
    with raises(PlanError, "links[0] is missing dst", "required: src, dst, bandwidth"):
        _load_cluster(tmp_path, {"devices": [GPU, GPU], "links": [{"src": 0, "bandwidth": 1e9}]})
    with raises(PlanError, "expected an object with a 'devices' list"):
        _load_cluster(tmp_path, {"links": []})


def test_cluster_file_with_negative_bandwidth(tmp_path):
    with raises(PlanError, "cluster.json", "links[0]", "bandwidth must be a positive number of bytes/s", "got -5"):
        _load_cluster(tmp_path, {"devices": [GPU, GPU], "links": [{"src": 0, "dst": 1, "bandwidth": -5}]})


def test_cluster_file_with_zero_memory(tmp_path):
    with raises(PlanError, "cluster.json", "devices[1]", "'gpu1'", "memory must be a positive number of bytes", "got 0"):
        _load_cluster(tmp_path, {"devices": [GPU, {**GPU, "name": "gpu1", "memory": 0}]})


@pytest.mark.parametrize("field, value, words", [
    ("memory", "8e10", ("memory", "'8e10'")),
    ("memory", True, ("memory", "True")),
    ("threads", 0, ("threads must be an integer >= 1",)),
    ("launch_overhead", -1, ("launch_overhead", "-1")),
    ("kind", "tpu", ("kind must be 'cpu', 'cuda' or 'meta'", "'tpu'")),
    ("speed", 3, ("unknown field(s) ['speed']",)),
])
def test_cluster_file_with_a_bad_device_field(tmp_path, field, value, words):
    with raises(PlanError, "devices[0]", *words):
        _load_cluster(tmp_path, {"devices": [{**GPU, field: value}]})


def test_cluster_file_with_a_bad_link(tmp_path):
    for link, words in (({"src": "a", "dst": 1, "bandwidth": 1e9}, ("src must be a device index", "'a'")),
                        ({"src": 0, "dst": 5, "bandwidth": 1e9}, ("outside 0..1",)),
                        ({"src": 0, "dst": 1, "bandwidth": None}, ("bandwidth", "None"))):
        with raises(PlanError, *words):
            _load_cluster(tmp_path, {"devices": [GPU, GPU], "links": [link]})
    with raises(PlanError, "given twice"):
        _load_cluster(tmp_path, {"devices": [GPU, GPU], "links": [{"src": 0, "dst": 1, "bandwidth": 1e9},
                                                                  {"src": 1, "dst": 0, "bandwidth": 2e9}]})


def test_cluster_file_that_is_not_a_cluster(tmp_path):
    with raises(PlanError, "expected an object with a 'devices' list", "got list"):
        _load_cluster(tmp_path, [GPU])
    (tmp_path / "cut.json").write_text(json.dumps({"devices": [GPU]})[:30])
    with raises(PlanError, "cut.json", "not valid JSON"):
        Cluster.load(tmp_path / "cut.json")


def test_example_inputs_that_do_not_fit_the_model_say_so():
    # was: the hint about value-dependent shapes (nonzero, item), which has nothing to do with it
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(TraceError) as info:
        fxpipe.compile(model, ["cpu", "cpu"], torch.randn(8, 7), microbatches=2)
    msg = str(info.value)
    assert "model(*example_inputs)" in msg and "nonzero" not in msg and "7] X [8, 16]" in msg and "While executing" not in msg


def test_value_dependent_shapes_keep_their_hint():
    class Select(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)[x[:, 0] > 0])  # how many rows survive depends on the values

    with pytest.raises(TraceError, match="depends on tensor values"):
        fxpipe.plan(Select(), ["cpu", "cpu"], torch.randn(8, 4), microbatches=2, capture_method="fx")


def test_target_none_reaches_loss_fn_of_every_microbatch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    x = torch.randn(7, 8)  # 3 microbatches of 3, 2, 2
    seen = []

    def loss_fn(out, target):
        seen.append(target)
        return out.pow(2).mean()

    cm = fxpipe.compile(model, ["cpu", "cpu"], x, microbatches=3)
    loss = cm.step(x, target=None, loss_fn=loss_fn)
    ref(x).pow(2).mean().backward()
    assert seen == [None, None, None]
    assert torch.allclose(loss, ref(x).pow(2).mean().detach(), **TOL)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, **TOL)
    # None inside a structure too, next to a split tensor
    t = torch.randn(7, 4)
    model.zero_grad()
    cm.step(x, target={"y": t, "mask": None}, loss_fn=lambda o, tt: F.mse_loss(o, tt["y"]) + (tt["mask"] is not None))
    ref.zero_grad()
    F.mse_loss(ref(x), t).backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, **TOL)


@pytest.mark.parametrize("profile", [False, True])
def test_meta_model_refused_by_compile_before_planning(monkeypatch, profile):
    # was: the whole model captured and planned first (10 s for a small model under load, minutes
    # for a large one), then refused by the runtime
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])

    def no_planning(*a, **k):
        raise AssertionError("planned before refusing")

    monkeypatch.setattr(fxpipe.api, "build_plan", no_planning)
    with raises(PlanError, "meta device", "fxpipe.plan", "backend='distributed'"):
        fxpipe.compile(model, ["cpu", "cpu"], torch.randn(8, 64, device="meta"), microbatches=2, profile=profile)
    # fxpipe.plan with profile=True refuses before capturing too
    monkeypatch.undo()
    monkeypatch.setattr(fxpipe.compiler.pipeline, "_front", no_planning)
    with raises(PlanError, "profile=True", "meta device"):
        fxpipe.plan(model, ["cpu", "cpu"], torch.randn(8, 64, device="meta"), microbatches=2, profile=True)
