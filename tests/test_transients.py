"""Backward transients and kept gradients in the memory model, the measured BI/BW split in the
ZB-H1 simulation, and the simulated allocator peak against a CPU measurement."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxpipe
from fxpipe import Plan
from fxpipe.compiler.pipeline import plan_costs
from fxpipe.passes.annotate_costs import annotate_costs, backward_transients, device_key, split_kept_gradients
from fxpipe.passes.emit_schedule import Op, emit_schedule
from fxpipe.passes.group_units import group_units
from fxpipe.passes.propagate_shapes import propagate_shapes
from fxpipe.passes.simulate_schedule import simulate_schedule

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("measured_vs_simulated", ROOT / "benchmarks" / "measured_vs_simulated.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def mlp(blocks: int = 4, d: int = 128, h: int = 512) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)) for _ in range(blocks)])


# ---- the estimate ----------------------------------------------------------------------------

def test_transients_of_two_linears_hand_computed():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    gm = fx.symbolic_trace(model)
    propagate_shapes(gm, [torch.randn(3, 4)])
    units = group_units(gm, min_units=2)
    assert units.names == ("0", "1")
    # unit 0, at the first linear: grads of its output (3x8) and of its weight and bias (4x8 + 8);
    # the model input gets none. Unit 1, at the second linear: grads of its input (3x8), its
    # output (3x2), its weight and bias (8x2 + 2). fp32.
    assert backward_transients(gm, 2) == (4.0 * (24 + 40), 4.0 * (24 + 6 + 18))
    # what BI keeps for BW: each linear's output gradient
    assert split_kept_gradients(gm, 2) == (4.0 * 24, 4.0 * 6)
    table = annotate_costs(gm, units)
    assert table.transient_bytes == (256.0, 192.0) and table.kept_grad_bytes == (96.0, 24.0)
    assert table.stage_kept(0, 2) == 120.0
    # a plain backward has freed unit 1's activations (its output, 3x2) by the time unit 0's
    # runs; a split backward's BI keeps them
    assert table.activation_bytes[1] == 24.0
    assert table.stage_transient(0, 2) == max(192.0, 256.0 - 24.0)
    assert table.stage_transient(0, 2, split=True) == 256.0
    assert table.stage_transient(1, 2) == 192.0


def test_transient_counts_a_residual_gradient_live_across_the_block():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)

        def forward(self, x):
            h = self.a(x)
            return h + self.b(h)  # h's gradient waits across b for the add's share

    gm = fx.symbolic_trace(Res())
    propagate_shapes(gm, [torch.randn(2, 4)])
    units = group_units(gm, min_units=1)
    # at b: grads of h (its input, already holding the add's share), of b's output and of
    # b.weight; the sum's gradient is gone by then (the add ran first, backwards). At the add:
    # h, b's output, the sum (3 x 8); at a: h and a.weight (8 + 16). The most is at b.
    assert max(backward_transients(gm, len(units))) == 4.0 * (8 + 8 + 16)


# ---- the simulator ---------------------------------------------------------------------------

def test_simulator_adds_transients_while_a_backward_runs():
    s = emit_schedule("1f1b", 2, 2)
    tl = simulate_schedule(s, [1.0, 1.0], [2.0, 2.0], [0.0, 0.0], activation_bytes=[100.0, 100.0],
                           transient_bytes=[10.0, 20.0])
    assert tl.peak_memory == (200.0, 100.0)
    # device 0 holds both microbatches when B(mb0) starts; device 1 one at a time
    assert tl.peak_allocated == (210.0, 120.0)
    for d, steps in enumerate(tl.allocated):
        assert steps[-1][1] == 0.0  # everything freed at the end
    # without transients, no allocator view
    assert simulate_schedule(s, [1.0] * 2, [2.0] * 2, [0.0] * 2, activation_bytes=[1.0, 1.0]).allocated is None


def test_simulator_keeps_bi_gradients_until_bw():
    s = emit_schedule("zb-h1", 2, 2)
    tl = simulate_schedule(s, [1.0, 1.0], [2.0, 2.0], [0.0, 0.0], activation_bytes=[0.0, 0.0],
                           transient_bytes=[0.0, 0.0], kept_bytes=[7.0, 5.0])
    # only kept gradients: the peak is how many BI->BW intervals overlap on a device, x bytes
    for d, kept in ((0, 7.0), (1, 5.0)):
        bis = [e for e in tl.events if e.device == d and e.instr.op is Op.BWD_INPUT]
        bws = {e.instr.mb: e for e in tl.events if e.device == d and e.instr.op is Op.BWD_WEIGHT}
        overlap = max(sum(1 for b in bis if b.end <= t < bws[b.instr.mb].end) for t in [b.end for b in bis])
        assert tl.peak_allocated[d] == kept * overlap


# ---- the measured BI/BW split ----------------------------------------------------------------

def _with_measured(plan: Plan, fwd: list[float], bwd: list[float], bi: list[float] | None) -> Plan:
    key = device_key(plan.cluster.devices[0])
    measured = {"fwd_s": {key: fwd}, "bwd_s": {key: bwd}}
    if bi is not None:
        measured["bi_fraction"] = {key: bi}
    # the stages' times as a profiled plan states them: sums of the measured unit times
    stages = tuple(dataclasses.replace(st, fwd_ms=1e3 * sum(fwd[st.units[0]:st.units[1]]),
                                       bwd_ms=1e3 * sum(bwd[st.units[0]:st.units[1]])) for st in plan.stages)
    return dataclasses.replace(plan, stages=stages, predicted={**plan.predicted, "measured_costs": measured})


def test_zb_h1_simulation_uses_the_measured_bi_fractions(tmp_path):
    x = torch.randn(16, 128)
    plan = fxpipe.plan(mlp(), ["cpu", "cpu"], (x,), microbatches=4, schedule="zb-h1")
    n = len(plan.costs.unit_names)
    fwd, bwd = [1e-3] * n, [2e-3 + 1e-4 * u for u in range(n)]
    frac = [0.1 + 0.8 * u / (n - 1) for u in range(n)]
    p = _with_measured(plan, fwd, bwd, frac)
    tl = fxpipe.simulate(p)
    for st in p.stages:
        a, b = st.units
        # the first stage has no differentiable input: the runtime's BI does nothing there
        bi = 0.0 if a == 0 else sum(bwd[u] * frac[u] for u in range(a, b))
        bw = sum(bwd[a:b]) - bi
        got_bi = {round(e.duration, 12) for e in tl.events if e.instr.op is Op.BWD_INPUT and e.instr.stage == st.index}
        got_bw = {round(e.duration, 12) for e in tl.events if e.instr.op is Op.BWD_WEIGHT and e.instr.stage == st.index}
        assert got_bi == {round(bi, 12)} and got_bw == {round(bw, 12)}
        assert bi != pytest.approx(sum(bwd[a:b]) / 2)  # the split is not the old half
    assert len(p.stages) == 2 and p.stages[1].units[0] > 0
    # the fractions survive the plan file
    p.save(tmp_path / "plan.json")
    q = Plan.load(tmp_path / "plan.json")
    assert plan_costs(q).measured_bi_fraction == plan_costs(p).measured_bi_fraction
    assert fxpipe.simulate(q).step_time == pytest.approx(tl.step_time)
    # a profiled plan without the split (written before it existed) keeps half and half
    old = fxpipe.simulate(_with_measured(plan, fwd, bwd, None))
    for e in old.events:
        a, b = p.stages[e.instr.stage].units
        if e.instr.op in (Op.BWD_INPUT, Op.BWD_WEIGHT) and a > 0:
            assert e.duration == pytest.approx(sum(bwd[a:b]) / 2)


def test_old_plan_files_without_transients_still_load(tmp_path):
    x = torch.randn(16, 128)
    plan = fxpipe.plan(mlp(), ["cpu", "cpu"], (x,), microbatches=4)
    path = tmp_path / "plan.json"
    plan.save(path)
    d = json.loads(path.read_text())
    assert "transient_bytes" in d["costs"] and "kept_grad_bytes" in d["costs"]
    del d["costs"]["transient_bytes"], d["costs"]["kept_grad_bytes"]
    path.write_text(json.dumps(d))
    q = Plan.load(path)
    assert q.costs.transient_bytes == () and q.costs.stage_transient(0, 3) == 0.0
    tl = fxpipe.simulate(q)
    assert tl.peak_allocated == tl.peak_memory  # nothing to add: the old model


def test_profiler_measures_the_split_per_unit():
    x = torch.randn(32, 128)
    plan = fxpipe.plan(mlp(blocks=2), ["cpu", "cpu"], (x,), microbatches=2, schedule="zb-h1", profile=True)
    frac = plan_costs(plan).measured_bi_fraction
    assert frac is not None
    (f,) = frac.values()
    assert len(f) == len(plan.costs.unit_names) and all(0.0 <= v <= 1.0 for v in f)
    names = plan.costs.unit_names
    assert len(names) == 2 * 3  # fewer ops than the units wanted: one unit per op (Linear, GELU, Linear, ...)
    assert f[0] < 0.3  # the first linear has no input gradient to make: BI is (almost) nothing
    assert f[1] > 0.7  # GELU has no weights: BW is (almost) nothing


# ---- against a measurement -------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zb-h1"])
def test_simulated_allocator_peak_matches_cpu_measurement(schedule):
    bench = _bench()
    model = mlp(d=256, h=1024)
    x, t = torch.randn(64, 256), torch.randn(64, 256)
    cm = fxpipe.compile(model, ["cpu", "cpu"], (x,), microbatches=4, schedule=schedule)
    cm.step(x, target=t, loss_fn=F.mse_loss)
    measured = bench.peak_allocated(cm, {"input": x}, t, F.mse_loss)
    predicted = fxpipe.simulate(cm.plan).peak_allocated
    for d, (p, m) in enumerate(zip(predicted, measured)):
        assert m > 0 and abs(p / m - 1) <= 0.15, (schedule, d, predicted, measured)
    # the gradients were counted as static, not as activations: the user's .grad is intact
    assert all(q.grad is not None for q in model.parameters())
