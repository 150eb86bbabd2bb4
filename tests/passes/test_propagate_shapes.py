"""propagate_shapes: meta-device shapes, dtypes and FLOPs on every node, without real compute."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from fxpipe import TraceError
from fxpipe.passes.propagate_shapes import FLOPS, VAL, propagate_shapes


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


@pytest.mark.parametrize("as_leaf", [True, False], ids=["call_module", "functional"])
def test_linear_shape_dtype_and_matmul_flops(as_leaf):
    m, k, n = 5, 16, 32
    # a Linear inside a module stays a call_module node; traced as the root it becomes F.linear on get_attrs
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(k, n)) if as_leaf else nn.Linear(k, n))
    assert propagate_shapes(gm, [torch.randn(m, k)]) is gm
    node = next(x for x in gm.graph.nodes if x.op == ("call_module" if as_leaf else "call_function"))
    val = node.meta[VAL]
    assert val.is_meta and tuple(val.shape) == (m, n) and val.dtype == torch.float32
    assert node.meta[FLOPS] == 2 * m * n * k
    if not as_leaf:
        assert tuple(nodes_by_name(gm)["weight"].meta[VAL].shape) == (n, k)


def test_chain_shapes_and_flops():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    gm = fx.symbolic_trace(model)
    propagate_shapes(gm, [torch.randn(5, 16)])
    by = nodes_by_name(gm)
    assert tuple(by["input_1"].meta[VAL].shape) == (5, 16)
    assert [tuple(by[k].meta[VAL].shape) for k in ("_0", "_1", "_2")] == [(5, 32), (5, 32), (5, 8)]
    assert [by[k].meta[FLOPS] for k in ("_0", "_1", "_2")] == [2 * 5 * 32 * 16, 0, 2 * 5 * 8 * 32]


def test_functional_ops_and_batched_matmul_flops():
    class Attn(nn.Module):
        def forward(self, q, k):
            s = q @ k.transpose(-2, -1)
            return torch.softmax(s, -1).sum(-1)

    b, t, d = 3, 7, 4
    gm = fx.symbolic_trace(Attn())
    propagate_shapes(gm, [torch.randn(b, t, d), torch.randn(b, t, d)])
    by = nodes_by_name(gm)
    assert tuple(by["transpose"].meta[VAL].shape) == (b, d, t)
    assert tuple(by["matmul"].meta[VAL].shape) == (b, t, t)
    assert by["matmul"].meta[FLOPS] == 2 * b * t * t * d
    assert tuple(by["sum_1"].meta[VAL].shape) == (b, t)


def test_dtypes_propagate():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.lin = nn.Linear(6, 3).to(torch.bfloat16)

        def forward(self, idx):
            return self.lin(self.emb(idx).to(torch.bfloat16)).argmax(-1)

    gm = fx.symbolic_trace(Emb())
    propagate_shapes(gm, [torch.randint(0, 10, (2, 5))])
    by = nodes_by_name(gm)
    assert by["idx"].meta[VAL].dtype == torch.int64
    assert by["emb"].meta[VAL].dtype == torch.float32 and tuple(by["emb"].meta[VAL].shape) == (2, 5, 6)
    assert by["lin"].meta[VAL].dtype == torch.bfloat16
    assert by["argmax"].meta[VAL].dtype == torch.int64 and tuple(by["argmax"].meta[VAL].shape) == (2, 5)


def test_real_model_is_not_touched():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fx.symbolic_trace(model)
    propagate_shapes(gm, [torch.randn(2, 4)])
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k])
    assert all(not p.is_meta for p in gm.parameters())
    # every value recorded is a meta tensor: nothing was computed for real
    vals = [n.meta[VAL] for n in gm.graph.nodes if n.op != "output"]
    assert all(v.is_meta for v in vals)


def test_model_built_on_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))
    x = torch.empty(8, 1024, device="meta")
    gm = fx.symbolic_trace(model)
    propagate_shapes(gm, [x])
    by = nodes_by_name(gm)
    assert [tuple(by[k].meta[VAL].shape) for k in ("_0", "_1", "_2")] == [(8, 4096), (8, 4096), (8, 1024)]
    assert by["_0"].meta[FLOPS] == 2 * 8 * 4096 * 1024
    assert all(p.is_meta for p in model.parameters())


def test_factory_op_with_device_keyword_stays_on_meta():
    class Pos(nn.Module):
        def forward(self, x):
            return x + torch.ones(x.size(1), device="cpu")

    gm = fx.symbolic_trace(Pos())
    propagate_shapes(gm, [torch.randn(2, 3)])
    out = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    assert out.meta[VAL].is_meta and tuple(out.meta[VAL].shape) == (2, 3)


@pytest.mark.parametrize("move", [
    lambda h: h.to("cpu"),
    lambda h: h.to(torch.device("cpu"), torch.float32),
    lambda h: h.to(device="cpu"),
    lambda h: h.cpu(),
], ids=["to-str", "to-device-dtype", "to-kw", "cpu"])
def test_device_move_stays_on_meta(move):
    """A device move in the model (positional, keyword or .cpu()) must not copy the meta value out."""

    class Move(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return move(self.lin(x)) + 1

    gm = fx.symbolic_trace(Move())
    propagate_shapes(gm, [torch.randn(2, 4)])
    out = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")][-1]
    assert out.meta[VAL].is_meta and tuple(out.meta[VAL].shape) == (2, 4)


def test_device_move_in_an_export_graph_stays_on_meta():
    from fxpipe.compiler.capture import capture

    class Move(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).to(torch.device("cpu"), torch.bool)

    cap = capture(Move(), (torch.randn(2, 4),), method="export")
    assert any("to" in str(n.target) for n in cap.gm.graph.nodes if n.op == "call_function")
    propagate_shapes(cap.gm, [torch.randn(2, 4)])
    out = next(n for n in cap.gm.graph.nodes if n.op == "output").args[0][0]
    assert out.meta[VAL].is_meta and out.meta[VAL].dtype == torch.bool


def test_data_dependent_shape_is_a_trace_error_naming_the_node():
    class Select(nn.Module):
        def forward(self, x):
            return x[x > 0]

    gm = fx.symbolic_trace(Select())
    with pytest.raises(TraceError, match="getitem"):
        propagate_shapes(gm, [torch.randn(4, 4)])


def test_tuple_outputs_and_python_values():
    class Split(nn.Module):
        def forward(self, x):
            a, b = x.split(3, dim=1)
            return a * b, x.size(0)

    gm = fx.symbolic_trace(Split())
    propagate_shapes(gm, [torch.randn(5, 6)])
    by = nodes_by_name(gm)
    parts = by["split"].meta[VAL]
    assert isinstance(parts, tuple) and [tuple(p.shape) for p in parts] == [(5, 3), (5, 3)]
    assert tuple(by["mul"].meta[VAL].shape) == (5, 3)
    assert by["size"].meta[VAL] == 5


class _PackedLSTM(nn.Module):
    """An LSTM over a packed sequence: the packing reads the lengths' values."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(16, 16, batch_first=True)

    def forward(self, x, lengths):
        p = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(p)
        return h[-1]


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.BatchNorm1d(5)  # before the leaf: buffers the real prefix must leave alone
        self.emb = nn.Linear(8, 16)
        self.enc = _PackedLSTM()
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x, lengths):
        return self.head(self.enc(self.emb(self.pre(x)), lengths))


def test_leaf_module_reading_input_values_runs_for_real_once():
    import fxpipe
    from fxpipe.compiler.pipeline import build_plan

    torch.manual_seed(0)
    model = _Classifier()
    x, lengths = torch.randn(6, 5, 8), torch.tensor([5, 3, 2, 5, 1, 4])
    t = torch.randn(6, 4)
    ref = _Classifier()
    ref.load_state_dict(model.state_dict())
    rng = torch.get_rng_state()
    comp = build_plan(model, ["cpu", "cpu"], (x, lengths), microbatches=3, leaf_modules=(_PackedLSTM,))
    # the shape fallback ran the prefix for real, but left the model and the RNG untouched
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model.pre.running_var, ref.pre.running_var) and model.pre.num_batches_tracked == 0
    enc = next(n for n in comp.captured.gm.graph.nodes if n.op == "call_module" and n.target == "enc")
    assert tuple(enc.meta[VAL].shape) == (2, 16) and enc.meta[VAL].is_meta  # one microbatch of 2
    assert enc.meta[FLOPS] > 0
    cm = fxpipe.compile(model, ["cpu", "cpu"], (x, lengths), microbatches=3, leaf_modules=(_PackedLSTM,))
    # training equals eager (microbatches of 2: BatchNorm statistics per microbatch, as eager on each)
    loss = cm.step(x, lengths, target=t, loss_fn=nn.functional.mse_loss)
    want = sum(nn.functional.mse_loss(ref(x[i:i + 2], lengths[i:i + 2]), t[i:i + 2]) for i in (0, 2, 4)) / 3
    want.backward()
    assert torch.allclose(loss, want.detach(), atol=1e-6)
    for (k, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), k


def test_leaf_module_reading_input_values_on_meta_says_what_to_do():
    import fxpipe

    with torch.device("meta"):
        model = _Classifier()
    x, lengths = torch.randn(6, 5, 8, device="meta"), torch.tensor([5, 3, 2, 5, 1, 4])
    with pytest.raises(TraceError, match="'enc' is a leaf module.*real model and real example inputs"):
        fxpipe.plan(model, ["h100"] * 2, (x, lengths), microbatches=2, leaf_modules=(_PackedLSTM,))
