"""Offload streaming combined with activation recomputation (runtime/unit_recompute.py).

An offloaded stage that recomputes checkpoints each streamed unit on its own: it keeps per
microbatch only the values crossing between its units, and in backward recomputes unit k with
the copy of unit k's weights fetched for its backward (one fetch per unit and microbatch
backward, at most two units resident). The planner prices it and picks it where nothing
cheaper fits.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpipe
from fxpipe.compiler.cluster import CUDA_PRESETS, Cluster, Device
from fxpipe.errors import PlanError
from fxpipe.models import tiny_gpt
from fxpipe.passes.partition_stages import weight_buffer
from fxpipe.runtime import offload as offload_mod
from fxpipe.runtime.offload import DEFAULT_MIN_UNIT_BYTES

from test_equivalence import LOSS_TOL, assert_same_grads, assert_same_output, make_mlp, mse


@pytest.fixture
def per_module_units(monkeypatch):
    """One streamed unit per parameter-owning module: the test models are far below 4 MiB."""
    monkeypatch.setattr(offload_mod, "DEFAULT_MIN_UNIT_BYTES", 0)


class _Block(nn.Module):
    """A small pre-LN transformer block with dropout in attention and MLP."""

    def __init__(self, d: int = 16, p: float = 0.2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        x = x + self.drop(self.proj(a @ v))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


def _transformer(p: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), _Block(p=p), _Block(p=p), _Block(p=p), nn.Linear(16, 8))


def _run(model, x, t, m, schedule, recompute, offload, seed=None):
    cm = fxpipe.compile(model, ["cpu", "cpu"], example_inputs=(x,), microbatches=m, schedule=schedule,
                        recompute=recompute, offload=offload)
    assert all(s.recompute == recompute and s.offload == (offload == "on") for s in cm.plan.stages)
    if seed is not None:
        torch.manual_seed(seed)
    loss = cm.step(x, target=t, loss_fn=mse)
    return cm, loss


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("make", [make_mlp, lambda: _transformer(p=0.0)], ids=["mlp", "transformer"])
def test_equals_eager_offload_only_and_recompute_only(per_module_units, schedule, m, make):
    x, t = torch.randn(9, 4, 8 if make is not make_mlp else 16), None
    model = make()
    ref, init = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        want = ref(x)
    t = torch.randn_like(want)
    cm, loss = _run(model, x, t, m, schedule, True, "on")
    assert set(cm._rt.streamers) == {0, 1} and all(st.recompute for st in cm._rt.streamers.values())
    assert_same_output(cm(x), want)
    ref_loss = mse(ref(x), t)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
    assert_same_grads(model, ref)
    for other in ((False, "on"), (True, "off")):  # the same numbers as either alone
        twin = copy.deepcopy(init)
        _, other_loss = _run(twin, x, t, m, schedule, *other)
        torch.testing.assert_close(loss, other_loss, rtol=1e-6, atol=1e-7)
        assert_same_grads(model, twin, tol=dict(rtol=1e-5, atol=1e-7))
    for st in cm._rt.streamers.values():
        assert st.stats.live_bytes == 0
        for unit in st.units:
            assert all(p.device.type == "cpu" and p.grad is not None for p in unit.params)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dropout_draws_the_same_masks_in_recomputation(per_module_units, schedule):
    """Dropout on both CPU workers: each (stage, microbatch) draws from its own seeded
    generator; recomputing unit by unit must replay exactly the forward's draws, so the
    combined run equals offload-only (which never recomputes) and recompute-only."""
    x = torch.randn(6, 4, 8)
    t = torch.randn(6, 4, 8)
    model = _transformer()
    cm, loss = _run(model, x, t, 3, schedule, True, "on", seed=123)
    assert all(st.uses_rng for st in cm._rt.stages) and cm._rt._seeded
    for other in ((False, "on"), (True, "off")):
        twin = _transformer()
        _, other_loss = _run(twin, x, t, 3, schedule, *other, seed=123)
        torch.testing.assert_close(loss, other_loss, rtol=1e-6, atol=1e-7)
        assert_same_grads(model, twin, tol=dict(rtol=1e-5, atol=1e-7))
    # and a second step draws new masks (the loss changes) but stays equal to the twins'
    assert not torch.equal(cm.step(x, target=t, loss_fn=mse), loss)


def test_dropout_one_worker_equals_eager(per_module_units):
    """Dropout only in the last stage (one worker draws, from torch's generator, in
    microbatch order): equal to eager microbatch by microbatch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 32), nn.Dropout(0.5), nn.GELU(), nn.Linear(32, 32), nn.Dropout(0.3),
                          nn.Linear(32, 8)).train()
    ref = copy.deepcopy(model)
    x, t = torch.randn(8, 16), torch.randn(8, 8)
    cm = fxpipe.compile(model, ["cpu", "cpu"], (x,), microbatches=4, schedule="1f1b", recompute=True, offload="on")
    assert not cm._rt.stages[0].uses_rng and cm._rt.stages[1].uses_rng
    torch.manual_seed(123)
    loss = cm.step(x, target=t, loss_fn=mse)
    torch.manual_seed(123)
    total = sum(mse(ref(xm), tm) * (len(xm) / len(x)) for xm, tm in zip(x.chunk(4), t.chunk(4)))
    total.backward()
    torch.testing.assert_close(loss, total.detach(), **LOSS_TOL)
    assert_same_grads(model, ref)


def test_each_unit_fetched_once_per_backward_and_two_resident(per_module_units):
    """One stage of four Linears, two microbatches: the backward of each microbatch fetches
    units 3, 2, 1, 0 once each (the recomputation takes the copy fetched for the backward,
    unit 0 included: its recomputation needs its weights), and at most the two largest
    neighbouring units' copies are alive in either phase."""
    torch.manual_seed(0)
    model = make_mlp()
    ref = copy.deepcopy(model)
    x, t = torch.randn(8, 16), torch.randn(8, 8)
    cm = fxpipe.compile(model, ["cpu"], example_inputs=(x,), microbatches=2, schedule="gpipe", recompute=True,
                        offload="on")
    st = cm._rt.streamers[0]
    sizes = [u.nbytes for u in st.units]
    assert len(sizes) == 4 and len(cm._rt._unit_checkpoints[0].segments) == 4
    loss = cm.step(x, target=t, loss_fn=mse)
    fwd = [("F", k) for k in range(4)]
    bwd = [("B", k) for k in reversed(range(4))]
    assert st.stats.fetches == fwd * 2 + bwd * 2
    two = max(a + b for a, b in zip(sizes, sizes[1:]))
    assert 0 < st.stats.peak_live_bytes["F"] <= two < sum(sizes)
    assert 0 < st.stats.peak_live_bytes["B"] <= two
    assert st.stats.live_bytes == 0
    # the module's attributes are the host parameters again after the step
    assert all(isinstance(p, nn.Parameter) and p.device.type == "cpu" for p in st.module.parameters())
    ref_loss = mse(ref(x), t)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
    assert_same_grads(model, ref)


def test_batchnorm_statistics_updated_once(per_module_units):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).train()
    ref = copy.deepcopy(model)
    x, t = torch.randn(8, 8), torch.randn(8, 4)
    cm = fxpipe.compile(model, ["cpu"], (x,), microbatches=1, recompute=True, offload="on")
    cm.step(x, target=t, loss_fn=mse)
    mse(ref(x), t).backward()
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    assert int(model[1].num_batches_tracked) == 1
    assert_same_grads(model, ref)


# ----------------------------------------------------------------------------- planning


def _stage_need(plan, s) -> float:
    """An offloaded, recomputing stage's memory by hand from the plan's cost table: two
    consecutive units' weights and weight gradients + per microbatch in flight the incoming
    boundary and, per unit, what crosses its streamed cuts and the boundary after it + the
    activations of the largest streamed unit (units merged up to 4 MiB of weights, with the
    one before) + the largest gradient transient."""
    c = plan.costs
    a, b = plan.stages[s].units
    n = len(c.unit_names)
    bb = list(c.boundary_bytes) + [0.0]
    kept = (bb[a - 1] if a > 0 else 0.0) + sum(c.cut_bytes[u] + bb[u] for u in range(a, b))
    peaks = []
    for u in range(a, b):
        total, w, v = (c.activation_bytes[u - 1] if u > 0 else 0.0), 0.0, u
        while v < n:
            total, w, v = total + c.activation_bytes[v], w + c.param_bytes[v], v + 1
            if w >= DEFAULT_MIN_UNIT_BYTES:
                break
        peaks.append(total)
    streamed = [pb + tb for pb, tb in zip(c.param_bytes, c.trainable_bytes)]
    return (weight_buffer(streamed, a, b) + plan.stages[s].inflight * kept + max(peaks)
            + max(c.transient_bytes[a:b]))


def test_meta_model_only_the_combination_fits():
    """A GPT whose static state (weights, grads, Adam) exceeds the device and whose fp32
    activations exceed it too: offloading alone keeps every activation per microbatch, recomputing alone
    keeps every weight; before, "nothing fits". Now the stage streams and recomputes per
    unit, under the cap, as computed by hand."""
    kw = dict(n_layer=8, n_embd=2048, vocab_size=512, n_positions=256)
    with torch.device("meta"):
        meta = tiny_gpt(seed=None, **kw)
    tokens = torch.randint(0, 512, (8, 256), device="meta")
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    preset = {k: v for k, v in CUDA_PRESETS["h100"].items() if k != "memory"}

    def plan(memory, **opts):
        dev = Device("h100:0", "cuda", **preset, memory=memory)
        return fxpipe.plan(meta, Cluster((dev,)), (tokens,), microbatches=2, schedule="gpipe", **opts)

    roomy = 1e15
    both = plan(roomy, recompute=True, offload="on")
    only_off = plan(roomy, recompute=False, offload="on")
    only_rc = plan(roomy, recompute=True, offload="off")
    need = both.stages[0].memory_bytes
    assert both.stages[0].recompute and both.stages[0].offload
    assert need == pytest.approx(_stage_need(both, 0), rel=1e-9)
    cap = 1.05 * need
    # params, grads and Adam's state (4x the weights) do not fit; streamed, the activations do not
    assert 4 * weights > cap and only_off.stages[0].memory_bytes > cap and only_rc.stages[0].memory_bytes > cap
    for opts in (dict(recompute="auto", offload="off"), dict(recompute=False, offload="auto")):
        with pytest.raises(PlanError, match="no partition"):
            plan(cap, **opts)
    auto = plan(cap)  # recompute="auto", offload="auto": only the combination fits
    st = auto.stages[0]
    assert st.recompute and st.offload and st.memory_bytes == pytest.approx(need, rel=1e-9) and st.memory_bytes <= cap
    # slower than either alone: streamed, and one more forward in the backward
    assert st.bwd_ms > only_off.stages[0].bwd_ms
    assert "also recompute, unit by unit" in auto.summary()
    # a roomy device keeps the weights and the activations
    plain = plan(roomy)
    assert not plain.stages[0].recompute and not plain.stages[0].offload


def test_plan_file_round_trips_the_combination(tmp_path):
    kw = dict(n_layer=2, n_embd=256, vocab_size=128, n_positions=128)
    with torch.device("meta"):
        meta = tiny_gpt(seed=None, **kw)
    tokens = torch.randint(0, 128, (4, 128), device="meta")
    dev = Device("h100:0", "cuda", **{k: v for k, v in CUDA_PRESETS["h100"].items() if k != "memory"}, memory=1e12)
    p = fxpipe.plan(meta, Cluster((dev, dataclasses.replace(dev, name="h100:1"))), (tokens,), microbatches=2,
                    recompute=True, offload="on")
    assert all(s.recompute and s.offload for s in p.stages)
    assert any(c > 0 for c in p.costs.cut_bytes)
    path = tmp_path / "plan.json"
    p.save(path)
    q = fxpipe.Plan.load(path)
    assert [(s.recompute, s.offload, s.memory_bytes) for s in q.stages] == \
        [(s.recompute, s.offload, s.memory_bytes) for s in p.stages]
    assert q.costs.cut_bytes == p.costs.cut_bytes
    # inspect --why's memory table names both (it showed "recompute" alone)
    from fxpipe.passes.explain_plan import explain
    rows = [ln for ln in explain(q).splitlines() if "recompute + offload" in ln]
    assert len(rows) == 2, explain(q)
