"""Tied-weight replicas in the memory model.

A tensor read by several stages (GPT-2's `wte`: embedding and LM head) is the user's object in
the first stage that reads it and a replica in every later one (`api.CompiledModel._place`).
The replica holds its weight and, in training, its gradient; the distributed runtime's rank
also gives it optimizer state (its `parameters()` include it), so the planner prices a replica
like the original: weight + gradient + optimizer state. Checked by hand on small problems,
against brute force, and against the tensors the local runtime really keeps on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxpipe
from fxpipe.compiler.pipeline import _problem
from fxpipe.compiler.plan import OPTIMIZER_STATE_FACTOR, Plan
from fxpipe.errors import PlanError
from fxpipe.models import TinyGPT
from fxpipe.passes.emit_schedule import peak_inflight
from fxpipe.passes.explain_plan import stage_memory_split
from fxpipe.passes.partition_problem import replica_bytes
from fxpipe.passes.partition_stages import (PartitionProblem, all_partitions, evaluate_partition, partition_stages,
                                            stage_memory)

__all__: list[str] = []


def _prob(n: int = 4, p: int = 2, *, static=None, memory=None, replicas=(), times=None, **kw) -> PartitionProblem:
    return PartitionProblem(
        unit_names=tuple(f"u{i}" for i in range(n)),
        unit_time=tuple(tuple(t for _ in range(p)) for t in (times or (1.0,) * n)),
        boundary_time=((0.0,) * (p - 1),) * (n - 1), unit_static_bytes=tuple(static or (1.0,) * n),
        unit_activation_bytes=(0.0,) * n, boundary_bytes=(0.0,) * (n - 1), inflight=(1,) * p,
        device_memory=tuple(memory or (100.0,) * p), device_names=tuple(f"d{j}" for j in range(p)),
        replicas=replicas, **kw)


def test_a_stage_after_the_first_reader_holds_a_replica_by_hand():
    # tensor A (10 bytes) read by units 0 and 3; tensor B (5 bytes) by units 1 and 2
    reps = ((10.0, (0, 3)), (5.0, (1, 2)))
    pr = _prob(replicas=reps)
    assert stage_memory(pr, 0, 4, 0) == 4.0  # one stage holds both originals
    assert stage_memory(pr, 0, 2, 0) == 2.0  # the first readers: originals
    assert stage_memory(pr, 2, 4, 1) == 2.0 + 10.0 + 5.0  # reads A and B after their first readers
    assert stage_memory(pr, 1, 3, 1) == 2.0  # B's first reader is inside: the original
    assert stage_memory(pr, 3, 4, 1) == 1.0 + 10.0
    assert stage_memory(pr, 2, 3, 1) == 1.0 + 5.0
    assert replica_bytes(reps, 2, 4) == 15.0 and replica_bytes(reps, 0, 4) == 0.0


def test_the_dp_refuses_a_cut_that_fits_only_without_the_replica():
    # 4 equal units, devices of 3 bytes: without the replica the even cut [0,2)+[2,4) fits (2 each);
    # the replica of unit 0's tensor read again by unit 3 makes [2,4) need 2 + 2, so the DP
    # takes [0,3)+[3,4) (3, and 1 + 2)
    reps = ((2.0, (0, 3)),)
    before = partition_stages(_prob(memory=(3.0, 3.0)))
    assert before.bounds == ((0, 2), (2, 4))
    after = partition_stages(_prob(memory=(3.0, 3.0), replicas=reps))
    assert after.bounds == ((0, 3), (3, 4)) and after.stage_memory == (3.0, 3.0) and after.fits
    assert not evaluate_partition(_prob(memory=(3.0, 3.0), replicas=reps), ((0, 2), (2, 4))).fits
    with pytest.raises(PlanError, match="no partition"):
        partition_stages(_prob(memory=(2.5, 2.5), replicas=reps))


@pytest.mark.parametrize("seed", range(6))
def test_the_dp_with_replicas_matches_brute_force(seed: int):
    rng = random.Random(seed)
    n, p = 7, 3
    reps = []
    for _ in range(3):
        units = tuple(sorted(rng.sample(range(n), rng.randint(2, 3))))
        reps.append((float(rng.randint(1, 6)), units))
    pr = _prob(n, p, static=[float(rng.randint(1, 4)) for _ in range(n)], memory=[float(rng.randint(8, 16))] * p,
               times=[rng.uniform(0.5, 2.0) for _ in range(n)], replicas=tuple(reps))
    fitting = [q for q in all_partitions(pr) if q.fits]
    if not fitting:
        with pytest.raises(PlanError):
            partition_stages(pr)
        return
    best = partition_stages(pr)
    assert best.bottleneck == min(q.bottleneck for q in fitting)
    for (s, e), mem in zip(best.bounds, best.stage_memory):  # the DP's numbers are the helpers' to the bit
        assert mem == sum(pr.unit_static_bytes[s:e]) + replica_bytes(reps, s, e)


def test_problem_validates_replicas():
    with pytest.raises(PlanError, match="replicas"):
        _prob(replicas=((1.0, (2, 1)),))
    with pytest.raises(PlanError, match="replicas"):
        _prob(replicas=((1.0, (0, 9)),))
    with pytest.raises(PlanError, match="replicas"):
        _prob(replicas=((-1.0, (0, 1)),))


# ----------------------------------------------------------------------------- a real model


def _tiny() -> tuple[TinyGPT, torch.Tensor]:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=2048, n_embd=64, n_head=4), torch.randint(0, 2048, (4, 16))


def _loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), t.flatten())


@pytest.fixture(scope="module")
def tiny_plan() -> tuple[TinyGPT, torch.Tensor, fxpipe.Plan]:
    model, x = _tiny()
    # sgd: no optimizer state, so the runtime's tensors are the whole static state
    plan = fxpipe.plan(model, ["cpu", "cpu"], (x,), microbatches=2, optimizer="sgd", offload="off")
    return model, x, plan


def _without_replicas(plan: fxpipe.Plan, s: int) -> float:
    pr = _problem(plan.costs, plan.cluster, [st.device for st in plan.stages], peak_inflight(plan.schedule),
                  plan.train, plan.optimizer)
    return stage_memory(dataclasses.replace(pr, replicas=()), *plan.stages[s].units, s)


def test_tiny_gpt_stage_memory_counts_what_the_runtime_keeps_for_the_replica(tiny_plan):
    model, x, plan = tiny_plan
    wte = model.tok_emb.weight
    (shared,) = plan.costs.shared
    assert shared.bytes == shared.trainable_bytes == wte.numel() * 4
    last = plan.stages[-1]
    assert last.units[0] > shared.units[0] and shared.units[-1] == len(plan.costs.unit_names) - 1
    # the stage holding the LM head needs the replica's weight and gradient more than before
    added = last.memory_bytes - _without_replicas(plan, last.index)
    assert added == 2 * wte.numel() * 4
    assert plan.stages[0].memory_bytes == _without_replicas(plan, 0)  # the owner: nothing extra
    split = stage_memory_split(plan, last.index)
    assert split["total"] == pytest.approx(last.memory_bytes)

    # measured: what the runtime keeps for the last stage, its own tensors and their gradients
    # plus the replica and the replica's gradient (caught before it is summed into the original)
    cm = fxpipe.compile(model, plan=plan, example_inputs=(x,))
    caught: dict[int, int] = {}
    reduce = cm._reduce_replica_grads

    def spy() -> None:
        for _, rep in cm._replicas:
            caught[id(rep)] = rep.grad.nbytes
        reduce()

    cm._reduce_replica_grads = spy
    cm.step(x, target=x, loss_fn=_loss)
    ((canon, rep),) = cm._replicas
    assert canon is wte and rep is not wte
    module = cm._rt.stages[last.index].module
    kept = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    weights = sum(t.nbytes for t in kept.values())
    grads = sum(t.grad.nbytes for t in kept.values() if t is not rep and t.grad is not None) + caught[id(rep)]
    static = sum(plan.costs.param_bytes[a] + plan.costs.trainable_bytes[a] for a in range(*last.units))
    assert weights + grads == static + added  # predicted static state of the stage, to the byte


def test_adam_prices_the_replica_with_its_optimizer_state(tiny_plan):
    model, x, _ = tiny_plan
    plan = fxpipe.plan(model, ["cpu", "cpu"], (x,), microbatches=2, optimizer="adam", offload="off")
    w = model.tok_emb.weight.numel() * 4
    last = plan.stages[-1]
    assert last.memory_bytes - _without_replicas(plan, last.index) == w * (2 + OPTIMIZER_STATE_FACTOR["adam"])
    infer = fxpipe.plan(model, ["cpu", "cpu"], (x,), microbatches=2, train=False)
    assert infer.stages[-1].memory_bytes - _without_replicas(infer, infer.num_stages - 1) == w  # weight only


def test_plan_file_round_trips_shared_tensors_and_old_files_load(tiny_plan, tmp_path: Path):
    _, _, plan = tiny_plan
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back.costs.shared == plan.costs.shared and back.stages == plan.stages
    assert "restaged" not in back.predicted

    # a file from before replicas were counted: no "shared", stage memory without the replica
    d = json.loads(path.read_text())
    del d["costs"]["shared"]
    old = [_without_replicas(plan, s) for s in range(plan.num_stages)]
    for st, m in zip(d["stages"], old):
        st["memory_bytes"] = m
    d["predicted"]["peak_memory_bytes"] = old
    path.write_text(json.dumps(d))
    legacy = Plan.load(path)
    assert legacy.costs.shared == () and [s.memory_bytes for s in legacy.stages] == old
    assert "restaged" not in legacy.predicted  # its numbers agree with its own (replica-free) table

    d["costs"]["shared"] = [{"bytes": 4.0, "trainable_bytes": 4.0, "units": [3]}]
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=r"costs\.shared\[0\]\.units"):
        Plan.load(path)
