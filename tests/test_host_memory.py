"""Host memory of offloaded stages: devices know their node's host memory, offloaded stages
of one node share it, and the planner never calls a plan fitting whose offloaded stages
overfill a host (another plan, or a PlanError with the bytes needed and available)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import fxpipe
from fxpipe.compiler.cluster import CUDA_PRESETS, GiB, Cluster, Device, host_groups
from fxpipe.compiler.plan import Plan
from fxpipe.errors import PlanError
from fxpipe.passes.check_host_memory import host_shares
from fxpipe.passes.partition_stages import PartitionProblem, all_partitions, partition_stages, stage_offload

__all__: list[str] = []


def _mlp(layers: int = 16, width: int = 512) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def _weights(model: nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in model.parameters()))


def _gpu(name: str, memory: float, host: float | None, node: int = 0) -> Device:
    return Device(name, "cuda", 1e12, 1e11, memory, 5e-6, 1, node=node, host_bandwidth=1e15, host_memory=host)


# ----------------------------------------------------------------------------- devices


def test_presets_files_and_local_cpus_know_their_host_memory(tmp_path: Path):
    c = Cluster.preset("h100", 16)
    assert {d.host_memory for d in c.devices} == {CUDA_PRESETS["h100"]["host_memory"]}
    assert CUDA_PRESETS["h100"]["host_memory"] == 0.8 * 2048 * GiB  # 80% of a 2 TiB DGX-class node
    assert {d.host_memory for d in Cluster.preset("l4", 2, host_memory=100 * GiB).devices} == {100 * GiB}
    groups = host_groups(c.devices)
    assert sorted(groups) == [0, 1] and groups[0] == (list(range(8)), 0.8 * 2048 * GiB)
    cpu = Cluster.from_devices(["cpu"]).devices[0]
    assert cpu.host_memory is not None and cpu.host_memory > 0 and host_groups([cpu]) == {}  # its own memory

    path = tmp_path / "c.json"
    path.write_text(json.dumps(c.to_dict()))
    assert Cluster.load(path) == c
    plain = Cluster((_gpu("g0", 1e9, None, node=-1),))
    assert "host_memory" not in plain.to_dict()["devices"][0]  # unknown: left out, as old files have it
    assert Cluster.from_dict(plain.to_dict()).devices[0].host_memory is None
    with pytest.raises(PlanError, match="host_memory must be a positive number"):
        Cluster.from_dict({"devices": [dict(plain.to_dict()["devices"][0], host_memory=-1)]})


def test_devices_of_unknown_node_share_one_host_and_the_smallest_size_counts():
    devs = [_gpu("a", 1e9, 8e9, node=-1), _gpu("b", 1e9, 6e9, node=-1), _gpu("c", 1e9, None, node=3)]
    assert host_groups(devs) == {-1: ([0, 1], 6e9), 3: ([2], math.inf)}
    # an equal share per stage position on each host: a and b hold one stage each, c none
    assert host_shares(devs, [0, 1, 0, 1]) == (1.5e9, 1.5e9, 1.5e9, 1.5e9)
    assert host_shares(devs, [2]) == ()


# ----------------------------------------------------------------------------- partitioner


@pytest.mark.parametrize("seed", range(5))
def test_host_limits_in_the_dp_match_brute_force(seed: int):
    rng = random.Random(seed)
    n, p = 7, 3
    params = [float(rng.randint(1, 4)) for _ in range(n)]
    pr = PartitionProblem(
        unit_names=tuple(f"u{i}" for i in range(n)), unit_time=tuple((t,) * p for t in
                                                                    (rng.uniform(0.5, 2) for _ in range(n))),
        boundary_time=((0.0,) * (p - 1),) * (n - 1), unit_static_bytes=tuple(4 * w for w in params),
        unit_activation_bytes=(1.0,) * n, boundary_bytes=(0.0,) * (n - 1), inflight=(1,) * p,
        device_memory=tuple(float(rng.randint(6, 14)) for _ in range(p)), device_names=("a", "b", "c"),
        unit_param_bytes=tuple(params), unit_offload_time=tuple((2.5,) * p for _ in range(n)), offload="auto",
        host_memory=tuple(float(rng.randint(4, 20)) for _ in range(p)))
    fitting = [q for q in all_partitions(pr) if q.fits]
    for q in fitting:  # no fitting partition offloads a stage beyond its host share
        for j, ((s, e), off) in enumerate(zip(q.bounds, q.offload)):
            assert not off or sum(pr.unit_static_bytes[s:e]) <= pr.host_memory[j]
    if not fitting:
        with pytest.raises(PlanError):
            partition_stages(pr)
        return
    assert partition_stages(pr).bottleneck == min(q.bottleneck for q in fitting)


def test_an_offloaded_stage_over_its_host_share_does_not_offload():
    pr = PartitionProblem(unit_names=("u0",), unit_time=((1.0,),), boundary_time=(), unit_static_bytes=(8.0,),
                          unit_activation_bytes=(0.0,), boundary_bytes=(), inflight=(1,), device_memory=(4.0,),
                          device_names=("g",), unit_param_bytes=(2.0,), unit_offload_time=((1.0,),), offload="auto",
                          host_memory=(7.0,))
    assert not stage_offload(pr, 0, 1, 0)
    with pytest.raises(PlanError, match="no partition"):
        partition_stages(pr)


# ----------------------------------------------------------------------------- planner


def test_offload_beyond_the_nodes_host_memory_picks_another_plan():
    model = _mlp()
    x = torch.randn(16, 512)
    w = _weights(model)
    # "small" must stream whatever it holds; "big" keeps its share; both in node 0
    roomy = Cluster((_gpu("small", w / 2.5, None), _gpu("big", 100 * w, None)))
    free = fxpipe.plan(model, roomy, (x,), microbatches=2)
    (off,) = [s for s in free.stages if s.offload]
    (use,) = free.host_usage()
    assert use.stages == (off.index,) and use.used >= w and not math.isfinite(use.capacity)

    host = 0.8 * use.used  # less than the streamed stage's params + grads + Adam state
    tight = Cluster((_gpu("small", w / 2.5, host), _gpu("big", 100 * w, host)))
    plan = fxpipe.plan(model, tight, (x,), microbatches=2)
    (use,) = plan.host_usage()
    assert use.fits and use.capacity == host and 0 < use.used <= host
    (st,) = [s for s in plan.stages if s.offload]
    assert st.units[1] - st.units[0] < off.units[1] - off.units[0]  # a smaller streamed stage
    assert plan.predicted["host_memory"] == [{"node": 0, "bytes": use.used, "stages": [st.index], "capacity": host}]
    assert f"host memory of node 0: {use.used / GiB:.3f} GiB for stages [{st.index}] of {host / GiB:.1f} GiB" \
        in plan.summary()


def test_offload_that_no_plan_fits_in_host_memory_is_a_plan_error_with_the_numbers():
    model = _mlp()
    x = torch.randn(16, 512)
    w = _weights(model)
    host = 3 * w  # both stages must stream; together they need 4 x the weights
    cl = Cluster((_gpu("g0", w / 2.5, host), _gpu("g1", w / 2.5, host)))
    with pytest.raises(PlanError) as info:
        fxpipe.plan(model, cl, (x,), microbatches=2)
    msg = str(info.value)
    free = fxpipe.plan(model, Cluster((_gpu("g0", w / 2.5, None), _gpu("g1", w / 2.5, None))), (x,), microbatches=2)
    (use,) = free.host_usage()
    assert use.used == pytest.approx(4 * w)
    assert "do not fit in host memory" in msg and "node 0" in msg
    assert f"need {use.used / GiB:.2f} GiB, its host has {host / GiB:.2f} GiB" in msg
    assert "host_memory" in msg  # says how to give the true size


def test_stages_on_two_nodes_use_their_own_hosts():
    model = _mlp()
    x = torch.randn(16, 512)
    w = _weights(model)
    host = 2.5 * w  # each node's host holds one streamed half (2 x the weights), not both
    cl = Cluster((_gpu("g0", w / 2.5, host, node=0), _gpu("g1", w / 2.5, host, node=1)))
    plan = fxpipe.plan(model, cl, (x,), microbatches=2)
    uses = plan.host_usage()
    assert [u.node for u in uses] == [0, 1] and all(u.fits for u in uses)
    assert math.fsum(u.used for u in uses) == pytest.approx(4 * w)
    saved = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert saved.host_usage() == uses


def test_a_loaded_plan_that_overfills_a_host_is_refused_before_it_runs(tmp_path: Path, monkeypatch):
    # planned without a known host size, then run on nodes with less: before, compile(plan=...)
    # never looked at host memory (the device check came first here; on GPUs the run would start)
    import torch.distributed as dist

    model = _mlp()
    x = torch.randn(16, 512)
    w = _weights(model)
    plan = fxpipe.plan(model, Cluster((_gpu("cuda:0", w / 2.5, None), _gpu("cuda:1", w / 2.5, None))), (x,),
                       microbatches=2)
    (use,) = plan.host_usage()
    assert use.used == pytest.approx(4 * w) and not math.isfinite(use.capacity)
    d = plan.to_dict()
    for dev in d["cluster"]["devices"]:
        dev["host_memory"] = 3 * w
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    want = rf"offloaded stages \[0, 1\] need {use.used / GiB:.2f} GiB, its host has {3 * w / GiB:.2f} GiB.*Re-plan"
    for given in (str(path), Plan.load(path)):
        with pytest.raises(PlanError, match=want):
            fxpipe.compile(model, plan=given, example_inputs=(x,))
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)  # as torchrun would
    with pytest.raises(PlanError, match=want):
        fxpipe.compile(model, plan=str(path), example_inputs=(x,), backend="distributed", timeout=5)
    assert not dist.is_initialized()  # refused before any rendezvous
