"""Real training loops and planning at scale, as a new user runs them.

Each training test compares `fxpipe.compile(model, ["cpu"] * k)` with an untouched
`copy.deepcopy` of the model run eagerly (fp32, rtol 1e-4) over several optimizer steps.
Regression tests of fixes:

* zero-bubble (zb-h1) with layers unfrozen mid-training: the split backward exposed only the
  parameters that required grad when it was built, so an unfrozen layer silently got no
  gradient (runtime/weight_grad.py: every parameter's consumer is exposed, the trainable ones
  are chosen per step).
* `torch.autocast` around `cm(x)` / `cm.step`: autocast is thread-local and the local
  runtime's workers are threads, so the pipeline silently ran in fp32 (runtime/local.py: the
  caller's autocast state is re-entered around each forward).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpipe

__all__: list[str] = []

RTOL, ATOL = 1e-4, 1e-5


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.GELU())], nn.Linear(16, 4))


def _data(n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=g) for _ in range(n)], [torch.randn(8, 4, generator=g) for _ in range(n)]


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("over", ["compiled", "model"])
def test_adamw_with_scheduler_clipping_and_accumulation_equals_eager(over: str) -> None:
    """AdamW (weight decay) + StepLR + clip_grad_norm_ + 2-step accumulation, 12 steps: the
    optimizer works over cm.parameters() and over model.parameters() (the same tensors)."""
    m = _mlp()
    ref = copy.deepcopy(m)
    xs, ts = _data(12)
    cm = fxpipe.compile(m, ["cpu"] * 3, example_inputs=(xs[0],), microbatches=4)
    assert [id(p) for p in cm.parameters()] == [id(p) for p in m.parameters()]
    o1 = torch.optim.AdamW(cm.parameters() if over == "compiled" else m.parameters(), lr=1e-2, weight_decay=0.1)
    o2 = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    s1, s2 = torch.optim.lr_scheduler.StepLR(o1, 2, 0.5), torch.optim.lr_scheduler.StepLR(o2, 2, 0.5)
    for i in range(12):
        l1 = cm.step(xs[i], target=ts[i], loss_fn=F.mse_loss)
        l2 = F.mse_loss(ref(xs[i]), ts[i])
        l2.backward()
        torch.testing.assert_close(l1, l2.detach(), rtol=RTOL, atol=ATOL)
        if i % 2 == 1:
            n1 = torch.nn.utils.clip_grad_norm_(cm.parameters(), 0.05)
            n2 = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            torch.testing.assert_close(n1, n2, rtol=RTOL, atol=ATOL)
            for o, s in ((o1, s1), (o2, s2)):
                o.step()
                o.zero_grad()
                s.step()
    _assert_same_weights(m, ref)


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_freezing_and_unfreezing_mid_training_equals_eager(schedule: str) -> None:
    """Layers 0 and 2 start frozen, are unfrozen at step 3, and layer 4 is frozen at step 5.
    Before the fix, zb-h1 gave the unfrozen layers no gradient (their weights never moved)."""
    m = _mlp()
    for i in (0, 2):
        m[i].requires_grad_(False)
    ref = copy.deepcopy(m)
    xs, ts = _data(7)
    cm = fxpipe.compile(m, ["cpu"] * 2, example_inputs=(xs[0],), microbatches=4, schedule=schedule)
    o1 = torch.optim.SGD(m.parameters(), lr=0.1)  # frozen parameters are skipped by the optimizer
    o2 = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(7):
        if step == 3:
            for model in (m, ref):
                model[0].requires_grad_(True)
                model[2].requires_grad_(True)
        if step == 5:
            m[4].requires_grad_(False)
            ref[4].requires_grad_(False)
        cm.step(xs[step], target=ts[step], loss_fn=F.mse_loss)
        F.mse_loss(ref(xs[step]), ts[step]).backward()
        for (k, p), q in zip(m.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None), f"step {step} {k}: grad presence differs from eager"
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL, msg=lambda s: f"step {step} {k}: {s}")
        o1.step()
        o2.step()
        o1.zero_grad()
        o2.zero_grad()
    _assert_same_weights(m, ref)


def test_autocast_bf16_around_call_and_step_equals_eager() -> None:
    """The caller's torch.autocast reaches the worker threads: bf16 outputs and the same loss."""
    m = _mlp()
    ref = copy.deepcopy(m)
    xs, ts = _data(1)
    cm = fxpipe.compile(m, ["cpu"] * 2, example_inputs=(xs[0],), microbatches=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = cm(xs[0]), ref(xs[0])
        l1 = cm.step(xs[0], target=ts[0], loss_fn=F.mse_loss)
        l2 = F.mse_loss(ref(xs[0]), ts[0])
    l2.backward()
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # same bf16 ops on the same rows
    torch.testing.assert_close(l1, l2.detach(), rtol=1e-3, atol=1e-4)
    for p, q in zip(m.parameters(), ref.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)  # bf16 partial sums per microbatch
    # outside autocast the pipeline is fp32 again
    assert cm(xs[0]).dtype == torch.float32


def test_checkpoint_resume_under_another_plan_equals_uninterrupted_run(tmp_path) -> None:
    """Save at step 4 (model checkpoint + the optimizer's own state_dict, which checkpoints do
    not hold), resume in a fresh model compiled for 3 devices: equal to the uninterrupted run."""
    xs, ts = _data(8)
    m = _mlp()
    cm = fxpipe.compile(m, ["cpu"] * 2, example_inputs=(xs[0],), microbatches=4)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.1)
    for i in range(8):
        cm.step(xs[i], target=ts[i], loss_fn=F.mse_loss)
        opt.step()
        opt.zero_grad()
        if i == 3:
            cm.save_checkpoint(tmp_path / "ck")
            torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = _mlp()
    nn.init.zeros_(fresh[0].weight)  # not the saved values: the checkpoint must set them
    cm2 = fxpipe.compile(fresh, ["cpu"] * 3, example_inputs=(xs[0],), microbatches=2)
    cm2.load_checkpoint(tmp_path / "ck")
    opt2 = torch.optim.AdamW(cm2.parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for i in range(4, 8):
        cm2.step(xs[i], target=ts[i], loss_fn=F.mse_loss)
        opt2.step()
        opt2.zero_grad()
    _assert_same_weights(fresh, m)
    eager = _mlp()
    eager.load_state_dict(cm2.state_dict())
    torch.testing.assert_close(eager(xs[0]), cm2(xs[0]), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------
# Scale: the partition DP on many devices
# --------------------------------------------------------------------------------------


def _big_problem(n: int, p: int, seed: int, memory_factor: float, offload: str = "off"):
    """n units on p devices with a memory cap that pushes some stages to recompute (and
    offload): the shape of a meta-device Llama on 64 GPUs (n ~ 2000 node-level units)."""
    import numpy as np

    from fxpipe.passes.partition_problem import PartitionProblem

    rng = np.random.default_rng(seed)
    t = rng.uniform(0.1, 2.0, size=n) * np.where(rng.random(n) < 0.3, 10.0, 1.0)  # heavy and light units
    speed = rng.choice([1.0, 1.0, 1.5], size=p)
    static = rng.uniform(0, 4, size=n)
    act = rng.uniform(0, 2, size=n)
    bbytes = rng.uniform(0, 1, size=n - 1)
    inflight = [max(1, p - j) // 4 + 1 for j in range(p)]
    cap = memory_factor * (static.sum() / p + act.sum() / p * inflight[0])
    return PartitionProblem(
        unit_names=tuple(f"u{i}" for i in range(n)),
        unit_time=tuple(tuple(float(x * s) for s in speed) for x in t),
        boundary_time=tuple(tuple(float(b * 0.01) for _ in range(p - 1)) for b in bbytes),
        unit_static_bytes=tuple(map(float, static)),
        unit_activation_bytes=tuple(map(float, act)),
        boundary_bytes=tuple(map(float, bbytes)),
        inflight=tuple(inflight),
        device_memory=(cap,) * p,
        device_names=tuple(f"d{j}" for j in range(p)),
        unit_recompute_time=tuple(tuple(float(x * s / 3) for s in speed) for x in t),
        recompute="auto",
        unit_param_bytes=tuple(map(float, static / 4)) if offload != "off" else (),
        unit_offload_time=tuple(tuple(float(x * s * 1.3) for s in speed) for x in t) if offload != "off" else (),
        offload=offload,
    )


def _count_table_rows(monkeypatch) -> dict:
    """Make the partitioner count the stage-table rows it computes (into the returned "n")."""
    import fxpipe.passes.partition_stages as ps

    rows = {"n": 0}
    tables = ps._stage_tables

    def counting(prob, first=None):
        for end, time, memory in tables(prob, first):
            rows["n"] += time.shape[0]
            yield end, time, memory

    monkeypatch.setattr(ps, "_stage_tables", counting)
    return rows


@pytest.mark.parametrize("seed,offload", [(0, "off"), (1, "auto"), (2, "off")])
def test_partition_dp_skips_hopeless_stages_and_keeps_the_exact_answer(monkeypatch, seed: int, offload: str) -> None:
    """On many devices the min-max DP only computes stages that could be within the
    bottleneck (before: every start for every end, O(n^2 p), 350 s for a 7B Llama on 64
    H100s with schedule and microbatches "auto"). Same partition, same predicted times,
    and far fewer rows of stage tables computed."""
    import fxpipe.passes.partition_stages as ps

    problem = _big_problem(400, 32, seed, memory_factor=0.8, offload=offload)
    rows = _count_table_rows(monkeypatch)
    fast = ps.partition_stages(problem)
    fast_rows = rows["n"]
    rows["n"] = 0
    monkeypatch.setattr(ps, "_first_starts", lambda prob, bound: __import__("numpy").zeros(prob.n + 1, dtype=int))
    full = ps.partition_stages(problem)
    full_rows = rows["n"]
    assert fast == full  # bounds, times, memory, variants: bit-identical
    assert any(full.recompute) or any(full.offload), "the cap should force some stage to recompute or offload"
    assert full_rows == 2 * sum(range(1, problem.n + 1))  # two passes over every (start, end)
    assert fast_rows * 8 < full_rows, (fast_rows, full_rows)


def test_bottleneck_upper_bound_is_a_real_partitions_bottleneck() -> None:
    """The bound the DP prunes with is no better than the optimum (else it would cut it off)."""
    import fxpipe.passes.partition_stages as ps

    for seed in range(4):
        problem = _big_problem(120, 12, seed, memory_factor=0.8)
        ub = ps.bottleneck_upper_bound(problem)
        assert ps.partition_stages(problem).bottleneck <= ub < float("inf")


def test_optimal_bottleneck_without_a_fitting_cheap_split(monkeypatch) -> None:
    """Memory so tight that neither cheap split fits (no bound to start from): the bottleneck
    is found by doubling a guess from the lower bound, still exact and with less work."""
    import numpy as np

    import fxpipe.passes.partition_stages as ps

    problem = _big_problem(400, 32, 2, memory_factor=0.4)
    assert ps.bottleneck_upper_bound(problem) == float("inf")
    rows = _count_table_rows(monkeypatch)
    fast = ps.optimal_bottleneck(problem)
    fast_rows = rows["n"]
    caps = np.asarray(problem.device_memory)[None, :]
    full = ps._minmax_dp(problem, lambda t, m: np.where(m <= caps, t, np.inf), 0.0, np.maximum)[0][problem.n, problem.p - 1]
    assert fast == full < float("inf")
    assert fast_rows * 3 < sum(range(1, problem.n + 1)), fast_rows  # all tries together, vs one full DP


def test_png_timeline_draws_one_artist_per_row_and_colour(tmp_path, monkeypatch) -> None:
    """`fxpipe inspect --format png` of a 64-device, 32-microbatch plan took 66 s: one
    broken_barh per instruction. Now the boxes of a row and colour are one call (4.8 s there)."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from fxpipe.passes.plot_timeline import plot_timeline

    m = _mlp()
    plan = fxpipe.plan(m, ["cpu"] * 4, example_inputs=(torch.randn(16, 16),), microbatches=16)
    tl = fxpipe.simulate(plan)
    calls = {"n": 0, "boxes": 0}
    orig = Axes.broken_barh

    def counting(self, xranges, yrange, **kw):
        calls["n"] += 1
        calls["boxes"] += len(xranges)
        return orig(self, xranges, yrange, **kw)

    monkeypatch.setattr(Axes, "broken_barh", counting)
    plot_timeline(tl, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
    assert calls["boxes"] >= 2 * 4 * 16  # every F and B of every device is drawn
    assert calls["n"] <= 4 * 3  # per device: forward, backward, communication
