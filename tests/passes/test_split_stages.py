"""split_stages: cut a captured graph at unit bounds into per-stage graphs with explicit boundary I/O."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxpipe.passes.group_units import UNIT, group_units
from fxpipe.passes.propagate_shapes import propagate_shapes
from fxpipe.passes.split_stages import build_stage_module, resolve_attr, split_stages


def prepare(model: nn.Module, *inputs: torch.Tensor, min_units: int = 1) -> fx.GraphModule:
    """symbolic_trace + shapes + units: what split_stages reads. The output is a flat tuple, as capture makes it."""
    gm = fx.symbolic_trace(model)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], tuple):
        out.args = ((out.args[0],),)
        gm.recompile()
    propagate_shapes(gm, list(inputs))
    group_units(gm, min_units=min_units)
    return gm


def run_stages(model: nn.Module, gm: fx.GraphModule, stages, inputs: dict[str, torch.Tensor]) -> tuple:
    """Run the stage modules one after another, the way the runtime does: recv values then model inputs."""
    carried: tuple = ()
    for sg in stages:
        objects = {t: resolve_attr(model, gm, t) for t in sg.attrs + sg.modules}
        mod = build_stage_module(sg, objects)
        carried = tuple(mod(*carried, *[inputs[n] for n in sg.model_inputs]))
    return carried


def chain(n: int = 5) -> nn.Sequential:
    layers = []
    for i in range(n):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    return nn.Sequential(*layers)


class Skip(nn.Module):
    """l0's output is read again by the last unit (l3), and a parameter is read via get_attr."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2, self.l3 = (nn.Linear(8, 8) for _ in range(4))
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, x):
        a = torch.relu(self.l0(x))
        b = torch.relu(self.l1(a))
        c = torch.relu(self.l2(b))
        return self.l3(c) + a * self.w


class LateInput(nn.Module):
    """A second model input read only by the last unit."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, mask):
        return self.c(self.b(self.a(x))) * mask


# ---- names at known bounds ------------------------------------------------------------------


def test_chain_recv_send_names():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    gm = prepare(model, x)
    sgs = split_stages(gm, [(0, 2), (2, 4), (4, 5)])
    assert [sg.index for sg in sgs] == [0, 1, 2]
    assert [sg.recv for sg in sgs] == [(), ("_1",), ("_3",)]
    assert [sg.send for sg in sgs] == [("_1",), ("_3",), ("_4",)]
    assert [sg.model_inputs for sg in sgs] == [("input",), (), ()]
    assert [sg.modules for sg in sgs] == [("0", "1"), ("2", "3"), ("4",)]
    assert all(sg.attrs == () for sg in sgs)
    # each stage's placeholders are its recv values then its model inputs, in that order
    for sg in sgs:
        ph = [n.name for n in sg.graph.nodes if n.op == "placeholder"]
        assert len(ph) == len(sg.recv) + len(sg.model_inputs)
        assert ph[: len(sg.recv)] == list(sg.recv)
    torch.testing.assert_close(run_stages(model, gm, sgs, {"input": x}), gm(x), rtol=0, atol=0)


def test_skip_value_is_forwarded_through_the_middle_stage():
    model = Skip()
    x = torch.randn(4, 8)
    gm = prepare(model, x)
    names = {n.name: n.meta[UNIT] for n in gm.graph.nodes if UNIT in n.meta}
    assert names["relu"] == 0 and names["add"] == 3  # glue joins the unit before it
    sgs = split_stages(gm, [(0, 1), (1, 3), (3, 4)])
    first, mid, last = sgs
    assert first.send == ("relu",)
    assert "relu" in mid.recv and "relu" in mid.send  # forwarded, not skipped over
    assert mid.recv == ("relu",) and mid.send == ("relu", "relu_2")
    assert last.recv == ("relu", "relu_2")
    assert last.attrs == ("w",) and last.modules == ("l3",)
    assert last.send == ("add",)
    assert first.model_inputs == ("x",) and mid.model_inputs == () and last.model_inputs == ()
    torch.testing.assert_close(run_stages(model, gm, sgs, {"x": x}), gm(x), rtol=0, atol=0)


def test_model_input_goes_directly_to_the_stage_that_reads_it():
    model = LateInput()
    x, mask = torch.randn(4, 8), (torch.rand(4, 8) > 0.5).float()
    gm = prepare(model, x, mask)
    sgs = split_stages(gm, [(0, 1), (1, 2), (2, 3)])
    assert [sg.model_inputs for sg in sgs] == [("x",), (), ("mask",)]
    assert all("mask" not in sg.send and "mask" not in sg.recv for sg in sgs)
    torch.testing.assert_close(run_stages(model, gm, sgs, {"x": x, "mask": mask}), gm(x, mask), rtol=0, atol=0)


def test_output_produced_early_reaches_the_last_stage():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            return self.c(self.b(h)), h

    model = TwoOut()
    x = torch.randn(4, 8)
    gm = prepare(model, x)
    sgs = split_stages(gm, [(0, 1), (1, 2), (2, 3)])
    assert "a" in sgs[1].recv and "a" in sgs[1].send
    assert sgs[-1].send == ("c", "a")  # the model's flat outputs, in order
    torch.testing.assert_close(run_stages(model, gm, sgs, {"x": x}), gm(x), rtol=0, atol=0)


def test_split_does_not_mutate_the_graph_and_single_stage_is_whole():
    model = Skip()
    x = torch.randn(4, 8)
    gm = prepare(model, x)
    before = gm.code
    sgs = split_stages(gm, [(0, 4)])
    assert gm.code == before
    (sg,) = sgs
    assert sg.recv == () and sg.model_inputs == ("x",) and sg.send == ("add",)
    assert set(sg.modules) == {"l0", "l1", "l2", "l3"} and sg.attrs == ("w",)
    assert "def forward" in sg.code()
    torch.testing.assert_close(run_stages(model, gm, sgs, {"x": x}), gm(x), rtol=0, atol=0)


def test_stage_gradients_compose_to_the_whole_graph():
    """Backward through the stage modules with detached boundaries (as the runtime does) gives
    the same parameter gradients as backward through the whole graph."""
    model = Skip()
    x = torch.randn(4, 8)
    gm = prepare(model, x)
    sgs = split_stages(gm, [(0, 1), (1, 3), (3, 4)])
    mods = [build_stage_module(sg, {t: resolve_attr(model, gm, t) for t in sg.attrs + sg.modules}) for sg in sgs]
    (gm(x)[0] ** 2).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # forward with leaves at each boundary, then backward stage by stage from the last
    saved, carried = [], ()
    for sg, mod in zip(sgs, mods):
        leaves = [c.detach().requires_grad_(True) for c in carried]
        outs = mod(*leaves, *([x] if sg.model_inputs else []))
        saved.append((leaves, outs))
        carried = outs
    grads = None
    for leaves, outs in reversed(saved):
        if grads is None:
            (outs[0] ** 2).sum().backward()
        else:
            torch.autograd.backward(list(outs), grads)
        grads = [leaf.grad for leaf in leaves]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


# ---- any contiguous cut --------------------------------------------------------------------


@given(cuts=st.sets(st.integers(1, 9), max_size=6))
def test_any_cut_of_a_chain_with_skips(cuts):
    """For any contiguous bounds: neighbours agree on boundary names, and the stages run in
    sequence equal the whole graph."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(10))

        def forward(self, x):
            hs = [x]
            for i, layer in enumerate(self.layers):
                h = torch.tanh(layer(hs[-1]))
                if i % 3 == 2:
                    h = h + hs[i - 1]  # a skip over two layers
                hs.append(h)
            return hs[-1], hs[1]

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 8)
    gm = prepare(model, x, min_units=10)
    n_units = max(n.meta[UNIT] for n in gm.graph.nodes if UNIT in n.meta) + 1
    assert n_units == 10
    points = [0, *sorted(cuts), n_units]
    bounds = list(zip(points, points[1:]))
    sgs = split_stages(gm, bounds)
    assert len(sgs) == len(bounds)
    for a, b in zip(sgs, sgs[1:]):
        assert a.send == b.recv
    assert sgs[0].recv == ()
    torch.testing.assert_close(run_stages(model, gm, sgs, {"x": x}), gm(x), rtol=0, atol=0)


def test_resolve_attr_prefers_the_user_model():
    model = Skip()
    x = torch.randn(2, 8)
    gm = prepare(model, x)
    assert resolve_attr(model, gm, "w") is model.w
    assert resolve_attr(model, gm, "l0") is model.l0
    with pytest.raises(KeyError):
        resolve_attr(model, gm, "nope.weight")
