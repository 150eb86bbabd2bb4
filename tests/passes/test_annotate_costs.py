"""annotate_costs: per-node prices aggregated per unit, and the bytes that cross every cut."""

from __future__ import annotations

import time

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxpipe
from fxpipe.compiler.cluster import Device, cpu_calibration
from fxpipe.passes.annotate_costs import BWD_FACTOR, COST, CostTable, annotate_costs, boundary_bytes, value_bytes
from fxpipe.passes.group_units import group_units
from fxpipe.passes.propagate_shapes import propagate_shapes


def costs_of(model: nn.Module, *inputs: torch.Tensor, min_units: int = 1):
    gm = fx.symbolic_trace(model)
    propagate_shapes(gm, list(inputs))
    units = group_units(gm, min_units=min_units)
    return gm, units, annotate_costs(gm, units)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_chain_of_linears_hand_computed():
    b, dims = 5, [16, 32, 64, 8]
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in zip(dims, dims[1:])])
    gm, units, table = costs_of(model, torch.randn(b, dims[0]))
    assert table.unit_names == ("0", "1", "2")
    # after unit k the activation (b, dims[k+1]) in fp32 crosses the cut
    assert table.boundary_bytes == (b * 32 * 4, b * 64 * 4)
    assert table.param_bytes == tuple(float((i * o + o) * 4) for i, o in zip(dims, dims[1:]))
    assert sum(table.param_bytes) == param_bytes(model)
    assert table.trainable_bytes == table.param_bytes
    assert table.flops == tuple(float(2 * b * i * o) for i, o in zip(dims, dims[1:]))
    assert table.activation_bytes == tuple(float(b * o * 4) for o in dims[1:])
    # bytes moved by a leaf Linear: input read + weights read + output written
    assert table.bytes == tuple(float(b * i * 4 + (i * o + o) * 4 + b * o * 4) for i, o in zip(dims, dims[1:]))
    assert table.launches == (1, 1, 1)
    assert table.node_flops == tuple((f,) for f in table.flops)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert node.meta[COST].flops > 0


def test_bf16_halves_boundary_and_param_bytes():
    b = 4
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    _, _, table = costs_of(model, torch.randn(b, 8, dtype=torch.bfloat16))
    assert table.boundary_bytes == (b * 16 * 2,)
    assert sum(table.param_bytes) == param_bytes(model) == (8 * 16 + 16 + 16 * 8 + 8) * 2


def test_frozen_parameters_are_not_trainable_bytes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[0].requires_grad_(False)
    _, _, table = costs_of(model, torch.randn(2, 8))
    assert table.param_bytes == ((64 + 8) * 4.0, (64 + 8) * 4.0)
    assert table.trainable_bytes == (0.0, (64 + 8) * 4.0)


def test_shared_parameter_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.mid = nn.Linear(8, 8)

        def forward(self, idx):
            h = self.mid(self.emb(idx))
            return h @ self.emb.weight.t()  # the embedding reused as the output projection

    model = Tied()
    _, _, table = costs_of(model, torch.randint(0, 50, (2, 3)))
    assert sum(table.param_bytes) == param_bytes(model)


def test_skip_counts_at_every_cut_it_crosses():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.l0, self.l1, self.l2, self.l3 = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            a = self.l0(x)
            return self.l3(self.l2(self.l1(a))) + a

    b = 3
    gm, units, table = costs_of(Skip(), torch.randn(b, 8))
    assert table.unit_names == ("l0", "l1", "l2", "l3")
    one = b * 8 * 4
    # cut after l0: a; after l1: l1's output and a; after l2: l2's output and a
    assert table.boundary_bytes == (one, 2 * one, 2 * one)
    assert boundary_bytes(gm, len(units)) == table.boundary_bytes


def test_early_output_crosses_all_later_cuts():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.c(self.b(h)), h

    b = 2
    _, _, table = costs_of(TwoOut(), torch.randn(b, 8))
    assert table.boundary_bytes == (b * 4 * 4, b * 4 * 4 + b * 4 * 4)


def test_views_move_no_bytes_and_keep_no_activation():
    class View(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x).view(-1, 2, 4).transpose(1, 2)

    gm, _, _ = costs_of(View(), torch.randn(3, 8))
    for node in gm.graph.nodes:
        if node.op == "call_method":
            assert node.meta[COST].bytes == 0.0 and node.meta[COST].activation_bytes == 0.0, node.name


def test_value_bytes():
    assert value_bytes(torch.empty(3, 4, dtype=torch.float16, device="meta")) == 24
    assert value_bytes((torch.empty(2, device="meta"), [torch.empty(1, dtype=torch.int64, device="meta")])) == 16
    assert value_bytes(7) == 8 and value_bytes(None) == 0


def test_unit_time_is_roofline_plus_launches_and_backward_factor():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    _, _, table = costs_of(model, torch.randn(32, 64))
    dev = Device("x", "cpu", peak_flops=1e9, mem_bandwidth=1e9, memory=1e9, launch_overhead=1e-6)
    for u in range(len(table.unit_names)):
        f, bts = table.node_flops[u], table.node_bytes[u]
        want = sum(max(a / 1e9, c / 1e9) for a, c in zip(f, bts)) + table.launches[u] * 1e-6
        assert table.fwd_time(u, dev) == pytest.approx(want)
        assert table.unit_time(u, dev, train=True) == pytest.approx(want * (1 + BWD_FACTOR))


def test_cost_table_round_trip():
    _, _, table = costs_of(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), torch.randn(3, 4))
    assert CostTable.from_dict(table.to_dict()) == table


# ---- planning a model on the meta device -----------------------------------------------------


class _NoBigRealTensors(TorchDispatchMode):
    """Records every op that produces a non-meta tensor of at least `limit` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.numel() >= self.limit:
                self.seen.append(f"{func} -> {tuple(t.shape)}")
        return out


def test_plan_a_meta_model_allocates_nothing():
    n_layers, d = 8, 4096
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(d, d) for _ in range(n_layers)])
    x = torch.empty(8, d, device="meta")
    cpu_calibration()  # the one-time CPU measurement (cached on disk) is not the planner's doing
    t0 = time.perf_counter()
    with _NoBigRealTensors(limit=1 << 20) as watch:
        plan = fxpipe.plan(model, ["cpu"] * 3, example_inputs=(x,))
    elapsed = time.perf_counter() - t0
    assert watch.seen == [], f"real tensors were allocated while planning: {watch.seen[:5]}"
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(plan, fxpipe.Plan) and plan.num_stages == 3
    bounds = [s.units for s in plan.stages]
    assert bounds[0][0] == 0 and bounds[-1][1] == n_layers
    assert all(a < b for a, b in bounds) and all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))
    total = n_layers * (d * d + d) * 4
    assert sum(s.param_bytes for s in plan.stages) == total
    assert sum(plan.costs.param_bytes) == total
    assert elapsed < 30
