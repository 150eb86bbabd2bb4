"""group_units: compute nodes -> units (runs of one module at a chosen depth), the partitioner's atoms."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from fxpipe.passes.group_units import COMPUTE_OPS, UNIT, Units, group_units


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]


def assert_well_formed(gm: fx.GraphModule, units: Units) -> None:
    """Every compute node in exactly one unit; units are contiguous runs in node order."""
    nodes = compute_nodes(gm)
    tags = [n.meta[UNIT] for n in nodes]
    assert tags == sorted(tags), "unit indices must not decrease along the graph"
    assert set(tags) == set(range(len(units)))
    assert len(units.names) == len(units.nodes) == len(units) == len(set(units.names))
    flat = [name for unit in units.nodes for name in unit]
    assert flat == [n.name for n in nodes]
    for i, unit in enumerate(units.nodes):
        assert {n.meta[UNIT] for n in nodes if n.name in unit} == {i}
    gm.graph.lint()


def test_sequential_one_unit_per_child():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    gm = fx.symbolic_trace(model)
    units = group_units(gm, min_units=2)
    assert units.names == ("0", "1", "2", "3", "4")
    assert units.nodes == (("_0",), ("_1",), ("_2",), ("_3",), ("_4",))
    assert units.depth == 1
    assert_well_formed(gm, units)


def test_depth_is_the_shallowest_with_enough_units():
    def block():
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    model = nn.Sequential(block(), block(), block())
    gm = fx.symbolic_trace(model)
    coarse = group_units(gm, min_units=3)
    assert coarse.names == ("0", "1", "2") and coarse.depth == 1
    assert_well_formed(gm, coarse)
    fine = group_units(gm, min_units=4)
    assert fine.names == ("0.0", "0.1", "1.0", "1.1", "2.0", "2.1") and fine.depth == 2
    assert_well_formed(gm, fine)


def test_top_level_glue_joins_the_unit_before_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.a(x)) * 2
            return self.b(h) + x

    gm = fx.symbolic_trace(Net())
    units = group_units(gm, min_units=2)
    assert units.names == ("a", "b")
    assert units.nodes == (("a", "relu", "mul"), ("b", "add"))
    assert_well_formed(gm, units)


def test_leading_glue_is_its_own_top_unit():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x * 2))

    gm = fx.symbolic_trace(Net())
    units = group_units(gm, min_units=2)
    assert units.names == ("(top)", "a", "b")
    assert units.nodes[0] == ("mul",)
    assert_well_formed(gm, units)


def test_module_called_again_later_gets_a_numbered_unit():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    gm = fx.symbolic_trace(Net())
    units = group_units(gm, min_units=2)
    assert units.names == ("a", "b", "a#1")
    assert_well_formed(gm, units)


def test_getitems_stay_with_their_producer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 4)

        def forward(self, x):
            q, k, v = self.qkv(x).split(4, dim=-1)
            return self.out(q * k + v)

    gm = fx.symbolic_trace(Net())
    units = group_units(gm, min_units=2)
    getitems = [n for n in compute_nodes(gm) if n.target is operator.getitem]
    assert len(getitems) == 3
    split = getitems[0].args[0]
    assert {g.meta[UNIT] for g in getitems} == {split.meta[UNIT]}
    assert_well_formed(gm, units)


def test_no_module_structure_gives_one_unit_per_node():
    class Flat(nn.Module):
        def forward(self, x):
            return torch.tanh(torch.relu(x) * 3) + 1

    gm = fx.symbolic_trace(Flat())
    units = group_units(gm, min_units=4)
    assert units.depth == 0
    assert units.names == tuple(n.name for n in compute_nodes(gm))
    assert_well_formed(gm, units)


class FewModules(nn.Module):
    """Six compute nodes but only two modules: at most two units by module, six by node."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.tanh(h * 2)
        return self.b(h) + 1


def test_not_enough_modules_falls_back_to_single_nodes():
    gm = fx.symbolic_trace(FewModules())
    assert group_units(gm, min_units=2).names == ("a", "b")
    units = group_units(gm, min_units=4)
    assert units.depth == 0
    assert units.names == tuple(n.name for n in compute_nodes(gm))
    assert_well_formed(gm, units)


def test_huge_min_units_gives_single_nodes():
    gm = fx.symbolic_trace(FewModules())
    units = group_units(gm, min_units=10**9)
    assert units.depth == 0
    assert len(units) == len(compute_nodes(gm)) == 6
    assert_well_formed(gm, units)


def test_no_compute_nodes():
    class Ident(nn.Module):
        def forward(self, x):
            return x

    units = group_units(fx.symbolic_trace(Ident()))
    assert units == Units((), (), 0) and len(units) == 0


# ---- GPT-2 through torch.export -------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_graph():
    from transformers import GPT2Config, GPT2LMHeadModel

    from fxpipe.compiler.capture import capture

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cap = capture(GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 128, (2, 16)),))
    return cap.gm


def test_gpt2_blocks_are_units(gpt2_graph):
    units = group_units(gpt2_graph, min_units=8)
    assert units.depth == 2
    blocks = [f"transformer.h.{i}" for i in range(4)]
    for b in blocks:
        assert b in units.names
    idx = [units.names.index(b) for b in blocks]
    assert idx == list(range(idx[0], idx[0] + 4))  # consecutive, in layer order
    assert units.names[-1] == "lm_head"
    assert "transformer.ln_f" in units.names and units.names.index("transformer.ln_f") > idx[-1]
    # each block's matmuls (4 addmm) live in its own unit
    for b in blocks:
        nodes = units.nodes[units.names.index(b)]
        assert sum(1 for n in nodes if n.startswith("addmm")) == 4, (b, nodes)
    assert_well_formed(gpt2_graph, units)


def test_gpt2_coarse_depth(gpt2_graph):
    units = group_units(gpt2_graph, min_units=2)
    assert units.depth == 1
    assert "transformer" in units.names and units.names[-1] == "lm_head"
    assert_well_formed(gpt2_graph, units)
