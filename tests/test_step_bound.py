"""The step lower bound auto mode prunes candidates with (passes/step_bound.py): no plan of a
schedule can be faster than it, whatever the cut, device order, recompute or offload choice."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxpipe
from fxpipe.compiler.cluster import Cluster, Device
from fxpipe.errors import PlanError
from fxpipe.passes.step_bound import costs_step_lower_bound, step_lower_bound


def test_uniform_stages_one_f_one_b_is_above_the_bound_and_m_1_is_exact():
    # 8 units of 1 (fwd) + 2 (bwd) on 4 devices, 2 units per stage: 1F1B takes (m + p - 1) x 6
    fwd, tot = [1.0] * 8, [3.0] * 8
    for m in (1, 2, 4, 8, 64):
        lb = step_lower_bound("1f1b", m, 4, fwd, tot)
        assert m * 24 / 4 <= lb <= (m + 3) * 6
    assert step_lower_bound("1f1b", 1, 4, fwd, tot) == 24.0  # one microbatch: the whole chain
    assert step_lower_bound("gpipe", 1, 4, fwd, tot) == 24.0
    # zero bubble may leave weight gradients off the chain: a lower bound, still above m T / p
    assert 4 * 24 / 4 <= step_lower_bound("zb-h1", 4, 4, fwd, tot) < step_lower_bound("1f1b", 4, 4, fwd, tot)
    # interleaved: the same argument over its 2p stages (weaker than over p), never below m T / p
    il = step_lower_bound("interleaved", 4, 4, fwd, tot, n_stages=8)
    assert 24.0 <= il < step_lower_bound("1f1b", 4, 4, fwd, tot)
    assert il == pytest.approx(24 / (1 - (1 - 1 / 4) ** 8))
    assert step_lower_bound("from-a-file", 4, 4, fwd, tot) == 24.0  # busiest device only
    assert step_lower_bound("forward", 8, 4, fwd, fwd) == pytest.approx(8 / (1 - (1 - 1 / 8) ** 4))
    assert step_lower_bound("1f1b", 4, 4, [], []) == 0.0


def _model(widths: list[int]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in zip(widths, widths[1:])])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.sampled_from([16, 64, 256, 512]), min_size=5, max_size=9),
       speeds=st.lists(st.sampled_from([0.5, 1.0, 3.0]), min_size=2, max_size=4),
       kind=st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"]),
       m=st.sampled_from([1, 2, 3, 4, 8]), batch=st.sampled_from([8, 16]),
       train=st.booleans(), recompute=st.booleans(), offload=st.sampled_from(["off", "on"]))
def test_no_plan_beats_the_bound(widths, speeds, kind, m, batch, train, recompute, offload):
    devices = [Device(f"d{i}", "meta", 2e10 * s, 2e10 * s, 1e12, 5e-6 * s, host_bandwidth=1e9 * s)
               for i, s in enumerate(speeds)]
    cluster = Cluster.from_devices(devices)
    if not train:
        kind, recompute = "gpipe", False
    if (kind == "zb-h1" and offload == "on") or recompute:
        offload = "off"  # refused combinations: offload with zb-h1 or with recompute=True
    if kind == "zb-h1":
        recompute = False
    try:
        plan = fxpipe.plan(_model(widths), cluster, torch.randn(batch, widths[0]), schedule=kind, microbatches=m,
                           train=train, recompute=recompute, offload=offload)
    except PlanError as e:  # interleaved: 2 stages per device need twice the units
        assert "units" in str(e)
        return
    lb = costs_step_lower_bound(plan.costs, cluster.devices, kind, m, train, plan.num_stages)
    assert 0.0 < lb and math.isfinite(lb)
    assert plan.predicted["step_ms"] >= lb * 1e3 * (1 - 1e-9)


def test_auto_on_64_gpus_skips_most_candidates_and_keeps_the_best():
    """64 presets: only candidates whose bound beats a plan found are planned; the choice is
    the best of the planned ones, and it is the fastest of all candidates planned by hand."""
    model = _model([64] * 66)
    x = torch.randn(64, 64)
    cluster = Cluster.preset("h100", 64)
    plan = fxpipe.plan(model, cluster, x, schedule="auto", microbatches="auto", virtual_stages=None)
    rows = plan.predicted["auto"]
    skipped = [r for r in rows if r.get("skipped")]
    assert len(skipped) >= len(rows) // 2
    assert all(r["lower_bound_ms"] > plan.predicted["step_ms"] for r in skipped)
    planned = [r for r in rows if r["fits"]]
    assert plan.predicted["step_ms"] == min(r["step_ms"] for r in planned)
