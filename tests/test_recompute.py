"""Activation recomputation (issue 3): the partitioner's per-stage choice (exact against brute
force), the plan's record of it (JSON round trip, old files), the refusals, the must-show
memory case (no split fits without recomputation, fxpipe's fits with it) and the runtime:
outputs and every gradient equal to the untouched model with recomputation forced on."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxpipe
from fxpipe.compiler.cluster import Cluster
from fxpipe.compiler.plan import Plan
from fxpipe.errors import PlanError
from fxpipe.models import tiny_gpt
from fxpipe.passes.partition_stages import (PartitionProblem, evaluate_partition, memory_shortfall, partition_stages,
                                            stage_memory, stage_recompute, stage_time, uniform_partition)

GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


# ---- the partitioner -----------------------------------------------------------------------


def _problem(rng: random.Random, n: int, p: int, mode: str) -> PartitionProblem:
    def val(scale: float) -> float:
        return rng.choice([0.0, 1.0, round(rng.uniform(0.0, scale), 3)])

    prob = PartitionProblem(
        unit_names=tuple(f"u{i}" for i in range(n)),
        unit_time=tuple(tuple(val(10.0) for _ in range(p)) for _ in range(n)),
        boundary_time=tuple(tuple(val(2.0) for _ in range(p - 1)) for _ in range(n - 1)),
        unit_static_bytes=tuple(val(20.0) for _ in range(n)),
        unit_activation_bytes=tuple(val(30.0) for _ in range(n)),
        boundary_bytes=tuple(val(5.0) for _ in range(n - 1)),
        inflight=tuple(rng.randint(0, 5) for _ in range(p)),
        device_memory=(math.inf,) * p,
        device_names=tuple(f"d{j}" for j in range(p)),
        unit_recompute_time=tuple(tuple(val(5.0) for _ in range(p)) for _ in range(n)),
        recompute=mode,
    )
    caps = [rng.choice([math.inf, rng.uniform(0.0, 150.0), rng.uniform(0.0, 60.0)]) for _ in range(p)]
    return dataclasses.replace(prob, device_memory=tuple(caps))


def _variants(prob: PartitionProblem, s: int, e: int, j: int) -> list[tuple[float, float, bool]]:
    """(time, memory, recompute) of every way the stage may run, from the formulas."""
    t = sum(prob.unit_time[u][j] for u in range(s, e))
    if j < prob.p - 1 and e < prob.n:
        t += prob.boundary_time[e - 1][j]
    rc = sum(prob.unit_recompute_time[u][j] for u in range(s, e))
    static = sum(prob.unit_static_bytes[s:e])
    act = sum(prob.unit_activation_bytes[s:e])
    bounds = (prob.boundary_bytes[s - 1] if s > 0 else 0.0) + (prob.boundary_bytes[e - 1] if e < prob.n else 0.0)
    k = prob.inflight[j]
    plain = (t, static + k * (act + bounds), False)
    recompute = (t + rc, static + k * bounds + act, True)
    return {"off": [plain], "on": [recompute], "auto": [plain, recompute]}[prob.recompute]


def _brute_force(prob: PartitionProblem) -> tuple[float, float] | None:
    """min (bottleneck, sum) over every partition and every per-stage choice that fits."""
    best = None
    for cuts in itertools.combinations(range(1, prob.n), prob.p - 1):
        edges = (0, *cuts, prob.n)
        options = [[v for v in _variants(prob, edges[j], edges[j + 1], j) if v[1] <= prob.device_memory[j] * (1 + 1e-12)]
                   for j in range(prob.p)]
        for combo in itertools.product(*options):
            times = [v[0] for v in combo]
            key = (max(times), sum(times))
            if best is None or key[0] < best[0] - 1e-9 or (abs(key[0] - best[0]) <= 1e-9 and key[1] < best[1]):
                best = key
    return best


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, 8), st.integers(1, 4), st.sampled_from(["off", "on", "auto"]), st.integers(0, 2**32 - 1))
def test_recompute_dp_matches_brute_force(n, p, mode, seed):
    p = min(p, n)
    prob = _problem(random.Random(seed), n, p, mode)
    best = _brute_force(prob)
    if best is None:
        with pytest.raises(PlanError, match="fits in memory"):
            partition_stages(prob)
        assert memory_shortfall(prob) > 0
        return
    part = partition_stages(prob)
    assert math.isclose(part.bottleneck, best[0], rel_tol=1e-9, abs_tol=1e-9)
    assert sum(part.stage_time) <= best[1] * (1 + 1e-9) + 1e-9
    assert part.fits and memory_shortfall(prob) <= 0
    for j, (s, e) in enumerate(part.bounds):
        rc = stage_recompute(prob, s, e, j)
        assert (part.recompute[j] if part.recompute else False) == rc
        assert rc == (mode == "on") or mode == "auto"
        assert part.stage_time[j] == stage_time(prob, s, e, j)
        assert part.stage_memory[j] == stage_memory(prob, s, e, j) <= prob.device_memory[j]
        # what the helpers report is one of the stage's variants, and in auto mode the faster that fits
        t, mem, _ = next(v for v in _variants(prob, s, e, j) if v[2] == rc)
        assert math.isclose(part.stage_time[j], t, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(part.stage_memory[j], mem, rel_tol=1e-12, abs_tol=1e-12)
        if mode == "auto" and rc:
            plain = _variants(prob, s, e, j)[0]
            assert plain[1] > prob.device_memory[j]


def _hand_problem(mode: str, memory: float) -> PartitionProblem:
    # 4 units of 1 s (+0.5 s recompute each), 10 activation bytes each, boundaries of 1 byte,
    # 3 microbatches in flight on the first device, 1 on the second
    return PartitionProblem(
        unit_names=("a", "b", "c", "d"), unit_time=((1.0, 1.0),) * 4, boundary_time=((0.0,),) * 3,
        unit_static_bytes=(0.0,) * 4, unit_activation_bytes=(10.0,) * 4, boundary_bytes=(1.0,) * 3,
        inflight=(3, 1), device_memory=(memory, memory), device_names=("g0", "g1"),
        unit_recompute_time=((0.5, 0.5),) * 4, recompute=mode)


def test_recompute_makes_the_equal_split_fit_by_hand():
    # the equal split [0,2) [2,4): stage 0 keeps 3 x (20 + 1) = 63 bytes, or recomputing
    # 3 x 1 + 20 = 23 bytes; stage 1 keeps 1 x (20 + 1) = 21 bytes
    off = _hand_problem("off", 30.0)
    assert uniform_partition(off).stage_memory == (63.0, 21.0)
    with pytest.raises(PlanError, match="fits in memory"):  # even one unit keeps 3 x 11 = 33 bytes on g0
        partition_stages(off)
    auto = partition_stages(_hand_problem("auto", 30.0))
    assert auto.bounds == ((0, 2), (2, 4)) and auto.recompute == (True, False)
    assert auto.stage_memory == (23.0, 21.0) and auto.stage_time == (3.0, 2.0)
    on = evaluate_partition(_hand_problem("on", 30.0), ((0, 2), (2, 4)))
    assert on.recompute == (True, True) and on.stage_time == (3.0, 3.0) and on.stage_memory == (23.0, 21.0)


def test_without_recompute_the_message_suggests_it_and_with_it_names_the_recomputed_stage():
    with pytest.raises(PlanError, match=r"recompute=True or 'auto'"):
        partition_stages(_hand_problem("off", 22.0))
    with pytest.raises(PlanError) as e:
        partition_stages(_hand_problem("auto", 20.0))
    assert "microbatch being recomputed" in str(e.value) and "recompute=True or" not in str(e.value)


def test_recompute_needs_forward_times():
    with pytest.raises(PlanError, match="unit_recompute_time"):
        dataclasses.replace(_hand_problem("off", 1.0), unit_recompute_time=(), recompute="auto")
    with pytest.raises(PlanError, match="recompute must be one of"):
        dataclasses.replace(_hand_problem("off", 1.0), recompute="yes")


# ---- the plan --------------------------------------------------------------------------------


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(),
                         nn.Linear(32, 8))


def _deep_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 64)) for _ in range(8)])


def test_must_show_no_split_fits_without_recompute_and_fxpipes_fits_with_it():
    model, x = _deep_mlp(), torch.randn(64, 64)
    free = fxpipe.plan(model, ["cpu"] * 2, (x,), microbatches=4, schedule="gpipe", optimizer="sgd", recompute=False)
    need = [s.memory_bytes for s in free.stages]
    # the least memory any split needs without recomputation, and with it
    lo_plain = _least_memory(free, "off")
    lo_rc = _least_memory(free, "auto")
    assert lo_rc < lo_plain * 0.8  # GPipe keeps 4 microbatches: recomputation saves most of them
    cap = (lo_plain + lo_rc) / 2
    cluster = Cluster.from_devices(["cpu"] * 2, memory=cap)
    with pytest.raises(PlanError, match="no partition .* fits in memory"):
        fxpipe.plan(model, cluster, (x,), microbatches=4, schedule="gpipe", optimizer="sgd", recompute=False)
    plan = fxpipe.plan(model, cluster, (x,), microbatches=4, schedule="gpipe", optimizer="sgd", recompute="auto")
    assert any(s.recompute for s in plan.stages)
    assert all(s.memory_bytes <= cap for s in plan.stages)
    uniform = uniform_partition(_capped_problem(free, cap, "off"))
    assert max(need) > cap and not uniform.fits and max(uniform.stage_memory) > cap
    print(f"memory per device {cap / 2**20:.2f} MiB; without recomputation: uniform split "
          f"{[round(m / 2**20, 2) for m in uniform.stage_memory]} MiB, best split needs {lo_plain / 2**20:.2f} MiB; "
          f"fxpipe {[round(s.memory_bytes / 2**20, 2) for s in plan.stages]} MiB, recompute "
          f"{[s.recompute for s in plan.stages]}")
    # the recomputing stages pay one more forward in their backward
    for s in plan.stages:
        assert s.bwd_ms == pytest.approx(2 * s.fwd_ms + (s.fwd_ms if s.recompute else 0.0), rel=1e-9)
    assert plan.predicted["step_ms"] > free.predicted["step_ms"]
    # the same numbers in `inspect --why`
    from fxpipe.passes.explain_plan import explain, stage_memory_split

    for s in plan.stages:
        assert stage_memory_split(plan, s.index)["total"] == pytest.approx(s.memory_bytes, rel=1e-9)
    assert "recompute" in explain(plan)


def _capped_problem(plan: Plan, memory: float, mode: str) -> PartitionProblem:
    from fxpipe.compiler.pipeline import _problem
    from fxpipe.passes.emit_schedule import peak_inflight

    k = len(plan.stages)
    return _problem(plan.costs, Cluster.from_devices(["cpu"] * k, memory=memory), tuple(range(k)),
                    peak_inflight(plan.schedule), True, plan.optimizer, mode)


def _least_memory(plan: Plan, mode: str) -> float:
    lo, hi = 0.0, 1e12
    for _ in range(60):
        mid = (lo + hi) / 2
        try:
            partition_stages(_capped_problem(plan, mid, mode))
            hi = mid
        except PlanError:
            lo = mid
    return hi


def test_recompute_plan_round_trips_and_old_files_load_as_false(tmp_path: Path):
    x = torch.randn(8, 16)
    plan = fxpipe.plan(make_mlp(), ["cpu"] * 2, (x,), microbatches=4, recompute=True)
    assert [s.recompute for s in plan.stages] == [True, True]
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back == plan and [s.recompute for s in back.stages] == [True, True]
    data = json.loads(path.read_text())
    for s in data["stages"]:
        del s["recompute"]  # a file written before the field existed
    path.write_text(json.dumps(data))
    assert [s.recompute for s in Plan.load(path).stages] == [False, False]
    data["stages"][0]["recompute"] = "yes"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"stages\[0\]\.recompute.*true or false"):
        Plan.load(path)


def test_recompute_refusals():
    x = torch.randn(8, 16)
    with pytest.raises(PlanError, match="zb-h1"):
        fxpipe.plan(make_mlp(), ["cpu"] * 2, (x,), schedule="zb-h1", recompute=True)
    with pytest.raises(PlanError, match="train=True"):
        fxpipe.plan(make_mlp(), ["cpu"] * 2, (x,), train=False, recompute=True)
    with pytest.raises(PlanError, match="recompute must be True"):
        fxpipe.plan(make_mlp(), ["cpu"] * 2, (x,), recompute="sometimes")
    # a hand-edited zb-h1 plan with a recomputing stage is refused on load (both runtimes)
    plan = fxpipe.plan(make_mlp(), ["cpu"] * 2, (x,), schedule="zb-h1")
    assert not any(s.recompute for s in plan.stages)
    data = plan.to_dict()
    data["stages"][1]["recompute"] = True
    with pytest.raises(PlanError, match="splits the backward"):
        Plan.from_dict(data)
    with pytest.raises(PlanError, match="leave recompute out"):
        fxpipe.compile(make_mlp(), example_inputs=(x,), plan=plan, recompute=True)


# ---- the runtime -----------------------------------------------------------------------------


def _grads_equal(model: nn.Module, ref: nn.Module) -> None:
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL, msg=name)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_mlp_with_recompute_equals_eager(schedule):
    model = make_mlp()
    ref = copy.deepcopy(model)
    x, t = torch.randn(10, 16), torch.randn(10, 8)
    cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=3, schedule=schedule, recompute=True)
    assert all(s.recompute for s in cm.plan.stages)
    torch.testing.assert_close(cm(x), ref(x), rtol=1e-4, atol=1e-5)
    loss = cm.step(x, target=t, loss_fn=F.mse_loss)
    expected = F.mse_loss(ref(x), t)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-6)
    _grads_equal(model, ref)


def test_tiny_gpt_with_recompute_equals_eager():
    model = tiny_gpt(vocab_size=64, n_positions=16, n_embd=32, n_head=2, n_layer=2)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 16))
    cm = fxpipe.compile(model, ["cpu"] * 2, (ids,), microbatches=2, recompute=True)
    assert all(s.recompute for s in cm.plan.stages)

    def loss_fn(out, target):
        logits = out if isinstance(out, torch.Tensor) else out[0]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    loss = cm.step(ids, target=ids, loss_fn=loss_fn)
    expected = loss_fn(ref(ids), ids)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-6)
    _grads_equal(model, ref)


class _DropoutTail(nn.Module):
    """Dropout only in the second half, so one worker thread draws all random numbers and the
    draws happen in microbatch order, as in an eager loop over the microbatches."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.tail = nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.5), nn.GELU(), nn.Linear(32, 32), nn.Dropout(0.3),
                                  nn.Linear(32, 8))

    def forward(self, x):
        return self.tail(self.head(x))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dropout_recompute_draws_the_same_mask(schedule):
    model = _DropoutTail().train()
    ref = copy.deepcopy(model)
    x, t = torch.randn(8, 16), torch.randn(8, 8)
    cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=4, schedule=schedule, recompute=True)
    assert cm.plan.stages[1].recompute and cm._rt.stages[1].uses_rng and not cm._rt.stages[0].uses_rng
    torch.manual_seed(123)
    loss = cm.step(x, target=t, loss_fn=F.mse_loss)
    # eager, microbatch by microbatch, from the same generator state
    torch.manual_seed(123)
    total = sum(F.mse_loss(ref(xm), tm) * (len(xm) / len(x)) for xm, tm in zip(x.chunk(4), t.chunk(4)))
    total.backward()
    torch.testing.assert_close(loss, total.detach(), rtol=1e-4, atol=1e-6)
    _grads_equal(model, ref)  # a different mask on recomputation would change the gradients


def test_recompute_keeps_less_activation_memory():
    x, t = torch.randn(32, 64), torch.randn(32, 64)
    measured = {}
    for rc in (False, True):
        model = _deep_mlp()
        cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=4, schedule="gpipe", recompute=rc)
        cm.step(x, target=t, loss_fn=F.mse_loss, measure_memory=True)
        measured[rc] = cm.last_memory
    # autograd saves (almost) nothing inside a checkpointed forward until its backward
    assert all(b < a / 4 for a, b in zip(measured[False], measured[True])), measured


def test_distributed_ranks_recompute_and_equal_eager(tmp_path: Path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_distributed import Run, check

    cases = {"mlp_1f1b_recompute": {"model": "mlp", "batch": 8, "microbatches": 4, "schedule": "1f1b",
                                    "recompute": True},
             "mlp_gpipe_recompute": {"model": "mlp", "batch": 10, "microbatches": 4, "schedule": "gpipe",
                                     "recompute": True}}
    results, errors, _ = Run(2, cases, tmp_path, limit=180.0).finish()
    assert errors == [None, None], errors
    for name, case in cases.items():
        assert all(r[name]["recompute"] == [True, True] for r in results)
        check(name, case, results)
