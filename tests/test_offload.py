"""Offload streaming (runtime/offload.py): an offloaded stage computes exactly what the plain
model does, its weights visit the device one unit at a time in the expected order, at most
two units are live outside backward, and the gradients land on the host parameters.

On CPU the "device copies" are real copies made by the same code path as on CUDA, so the
grouping, the saved-tensor handles and the gradient path are all exercised here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxpipe
from fxpipe import PlanError
from fxpipe.runtime import offload as offload_mod
from fxpipe.runtime.local import LocalRuntime, StageRunner
from fxpipe.runtime.offload import WeightStreamer

from test_equivalence import (LOSS_TOL, TinyLM, assert_same_grads, assert_same_output, gpt2_loss, lm_loss, make_gpt2,
                              make_mlp, mse)


@pytest.fixture
def per_module_units(monkeypatch):
    """One unit per parameter-owning module: the test models are far below the default merge size."""
    monkeypatch.setattr(offload_mod, "DEFAULT_MIN_UNIT_BYTES", 0)


def _check(model, devices, m, schedule, args, target, loss_fn):
    ref = copy.deepcopy(model)
    cm = fxpipe.compile(model, devices, example_inputs=args, microbatches=m, schedule=schedule, offload="on")
    assert all(s.offload for s in cm.plan.stages)
    assert set(cm._rt.streamers) == set(range(cm.plan.num_stages))
    with torch.no_grad():
        want = ref(*args)
    assert_same_output(cm(*args), want)
    loss = cm.step(*args, target=target, loss_fn=loss_fn)
    ref_loss = loss_fn(ref(*args), target)
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **LOSS_TOL)
    assert_same_grads(model, ref)
    return cm


def _host_grads_only(cm):
    """Every streamed parameter got its gradient through the streamer, on the host tensor
    (a tied weight's replica hands its gradient to the owner after the step)."""
    replicas = {id(rep) for _, rep in cm._replicas}
    for st in cm._rt.streamers.values():
        for unit in st.units:
            for p in unit.params:
                assert p.device.type == "cpu"
                if id(p) not in replicas:
                    assert p.grad is not None and p.grad.device.type == "cpu"
        assert st.stats.live_bytes == 0, "device copies still alive after the step"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_mlp_offloaded_matches_eager(per_module_units, schedule):
    torch.manual_seed(0)
    x, t = torch.randn(10, 16), torch.randn(10, 8)
    cm = _check(make_mlp(), ["cpu", "cpu"], 4, schedule, (x,), t, mse)
    _host_grads_only(cm)
    # the weights really were copied, once per unit per forward at least
    for st in cm._rt.streamers.values():
        assert len(st.units) == 2
        assert sum(1 for ph, _ in st.stats.fetches if ph == "F") >= 2 * 4


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_gpt2_offloaded_matches_eager(per_module_units, schedule):
    """export-captured graph (get_attr weights), tied embedding / LM head across the two stages."""
    torch.manual_seed(0)
    x, t = torch.randint(0, 128, (4, 8)), torch.randint(0, 128, (4, 8))
    cm = _check(make_gpt2(), ["cpu", "cpu"], 2, schedule, (x,), t, gpt2_loss)
    _host_grads_only(cm)
    for st in cm._rt.streamers.values():
        assert len(st.units) >= 6  # per module: LayerNorms, attention and MLP projections


def test_tied_weights_in_one_stage(per_module_units):
    """tok.weight and head.weight are one tensor used by the first and the last unit of one stage:
    fetched for each, gradients from both uses add up on the host tensor."""
    torch.manual_seed(0)
    x, t = torch.randint(0, 64, (4, 8)), torch.randint(0, 64, (4, 8))
    model = TinyLM(tie=True)
    cm = _check(model, ["cpu"], 2, "gpipe", (x,), t, lm_loss)
    st = cm._rt.streamers[0]
    owners = [u.name for u in st.units if any(p is model.tok.weight for p in u.params)]
    assert owners == ["tok", "head"]


def test_fetch_order_and_freeing(per_module_units):
    """One stage of four Linears (4 units): forward fetches 0,1,2,3 (each prefetched during the
    previous one); backward fetches 3,2,1 again in reverse (unit 0 saved no weight: its input
    needs no gradient); at most two units' copies are alive outside backward."""
    torch.manual_seed(0)
    model = make_mlp()
    x, t = torch.randn(8, 16), torch.randn(8, 8)
    ref = copy.deepcopy(model)
    cm = fxpipe.compile(model, ["cpu"], example_inputs=(x,), microbatches=2, schedule="gpipe", offload="on")
    st = cm._rt.streamers[0]
    sizes = [u.nbytes for u in st.units]
    assert [u.name for u in st.units] == ["0", "2", "4", "6"]
    loss = cm.step(x, target=t, loss_fn=mse)
    assert st.stats.fetches == [("F", 0), ("F", 1), ("F", 2), ("F", 3)] * 2 + [("B", 3), ("B", 2), ("B", 1)] * 2
    two_largest_neighbours = max(a + b for a, b in zip(sizes, sizes[1:]))
    assert 0 < st.stats.peak_live_bytes["F"] <= two_largest_neighbours < sum(sizes)
    assert st.stats.peak_live_bytes["B"] <= two_largest_neighbours
    assert st.stats.live_bytes == 0
    ref_loss = mse(ref(x), t)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
    assert_same_grads(model, ref)


def test_saved_weights_become_handles(per_module_units):
    """Without the saved-tensor handles autograd would keep every unit's copy until backward:
    after a training forward no copy may be alive."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
    ref = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    st = WeightStreamer(gm, torch.device("cpu"))
    assert len(st.units) == 6
    x = torch.randn(4, 32, requires_grad=True)
    with st.forward_scope(train=True) as module:
        y = module(x)
    assert st.stats.live_bytes == 0
    assert st.stats.peak_live_bytes["F"] <= 2 * st.units[0].nbytes
    with st.backward_scope():
        y.sum().backward()
    st.finish_step()
    x2 = x.detach().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # the module's own attributes are the host parameters again
    assert all(isinstance(p, nn.Parameter) for p in gm.parameters())
    # the input needs a gradient here, so even the first unit's weight is fetched again
    assert st.stats.fetches == [("F", k) for k in range(6)] + [("B", k) for k in reversed(range(6))]


def test_units_merge_up_to_min_bytes():
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])  # 4224 bytes each
    st = WeightStreamer(torch.fx.symbolic_trace(model), torch.device("cpu"), min_unit_bytes=8000)
    assert [len(u.params) for u in st.units] == [4, 4, 4]
    assert st.nbytes == 6 * 4224


def test_offload_with_split_backward_is_refused():
    """(With recompute it runs: tests/test_offload_recompute.py.)"""
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    base = dict(index=0, module=gm, device=torch.device("cpu"), device_index=0, n_recv=0, input_positions=(0,),
                is_last=True, offload=True)
    with pytest.raises(PlanError, match="splits its backward"):
        LocalRuntime([StageRunner(**base, n_out=1)], [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_below_all_weights():
    """On the GPU the stage's weights stay in pinned host memory: the device's peak stays below
    the weights' size, and outputs and gradients match the model run on the CPU."""
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(2048, 2048), nn.GELU()]
    model = nn.Sequential(*layers)  # 8 x 16 MiB of fp32 weights
    ref = copy.deepcopy(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    x, t = torch.randn(64, 2048), torch.randn(64, 2048)
    cm = fxpipe.compile(model, ["cuda:0"], example_inputs=(x.cuda(),), microbatches=2, schedule="1f1b", offload="on")
    assert cm.plan.stages[0].offload
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.parameters())
    # a first step allocates what stays (cuBLAS workspaces of the worker and autograd threads,
    # 32 MiB each on an H100): measure the second, with the first's gradients cleared
    cm.step(x.cuda(), target=t.cuda(), loss_fn=mse)
    cm.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = cm.step(x.cuda(), target=t.cuda(), loss_fn=mse)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # streaming: never all the weights at once, and within the planner's memory model (two
    # units' weights and weight gradients, activations, transients) up to 15%
    predicted = cm.plan.stages[0].memory_bytes
    assert peak < weights and peak <= 1.15 * predicted, (peak, weights, predicted)
    ref_loss = mse(ref(x), t)
    ref_loss.backward()
    torch.testing.assert_close(loss.cpu(), ref_loss.detach(), rtol=1e-3, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.device.type == "cpu", name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
