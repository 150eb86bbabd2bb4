"""Capture by repetition (compiler/repeat_capture.py): trace two blocks, copy the second.

The replicated graph must be the full capture's graph node for node (same fingerprint), run
like eager on real weights, price like the full graph, and refuse models whose blocks are
not interchangeable.
"""

from __future__ import annotations

import torch
from torch import nn
import pytest

import fxpipe
from fxpipe.compiler.capture import capture
from fxpipe.compiler.pipeline import _fingerprint
from fxpipe.compiler.repeat_capture import TEMPLATE, RepeatUnsupported, find_block_list, truncated_model
from fxpipe.errors import TraceError
from fxpipe.models import tiny_gpt
from fxpipe.passes.propagate_shapes import VAL, propagate_shapes


def _tokens(vocab: int, batch: int = 4, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _ops(cap) -> list[tuple[str, str]]:
    return [(n.op, n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
            for n in cap.gm.graph.nodes]


def _assert_same_as_full(model: nn.Module, x: torch.Tensor) -> None:
    full = capture(model, (x,))
    rep = capture(model, (x,), method="repeat")
    assert rep.repeated and not full.repeated
    assert rep.path == full.path
    assert _ops(rep) == _ops(full)  # node for node, in the same order
    assert _fingerprint(model, rep) == _fingerprint(model, full)
    copies = [n for n in rep.gm.graph.nodes if TEMPLATE in n.meta]
    assert copies, "the blocks after the first two must be copies"
    with torch.no_grad():
        want = [t for t in torch.utils._pytree.tree_leaves(model(x)) if isinstance(t, torch.Tensor)]
        got = rep.gm(x)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tinygpt_fx_path_matches_full_capture():
    _assert_same_as_full(tiny_gpt(n_layer=6, n_embd=32, vocab_size=64, n_positions=16).eval(), _tokens(64))


def test_user_model_is_not_touched():
    m = tiny_gpt(n_layer=5, n_embd=32, vocab_size=64, n_positions=16)
    before = (dict(m._modules), dict(m.blocks._modules), [id(p) for p in m.parameters()])
    blocks = find_block_list(m)
    small = truncated_model(m, blocks)
    assert len(small.blocks) == 2 and len(m.blocks) == 5
    assert small.blocks[1] is m.blocks[1] and small.tok_emb is m.tok_emb
    capture(m, (_tokens(64),), method="repeat")
    assert (dict(m._modules), dict(m.blocks._modules), [id(p) for p in m.parameters()]) == before


def test_meta_model_uses_repeat_and_its_plan_compiles_the_real_model():
    kw = dict(n_layer=6, n_embd=32, vocab_size=64, n_positions=16)
    with torch.device("meta"):
        meta = tiny_gpt(seed=None, **kw)
    x = _tokens(64)
    plan = fxpipe.plan(meta, ["cpu", "cpu"], (x.to("meta"),), microbatches=2)
    real = tiny_gpt(**kw).eval()
    full = fxpipe.plan(real, ["cpu", "cpu"], (x,), microbatches=2)
    assert plan.fingerprint == full.fingerprint
    assert plan.costs == full.costs  # reused shapes and saved-for-backward give the same prices
    assert [s.units for s in plan.stages] == [s.units for s in full.stages]
    cm = fxpipe.compile(real, plan=plan, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(cm(x), real(x))


def test_shapes_of_copies_equal_a_fresh_propagation():
    m = tiny_gpt(n_layer=5, n_embd=32, vocab_size=64, n_positions=16)
    x = _tokens(64)
    rep = capture(m, (x,), method="repeat")
    full = capture(m, (x,))
    propagate_shapes(rep.gm, [x])
    propagate_shapes(full.gm, [x])
    shapes = lambda cap: [tuple(n.meta[VAL].shape) for n in cap.gm.graph.nodes  # noqa: E731
                          if isinstance(n.meta.get(VAL), torch.Tensor)]
    assert shapes(rep) == shapes(full)


class _ScaledBlock(nn.Module):
    """A block whose graph depends on its index: block i scales by i + 1."""

    def __init__(self, d: int, i: int):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.layer_idx = i

    def forward(self, x):
        return self.lin(x) * float(self.layer_idx + 1)


class _Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.layers = nn.ModuleList(blocks)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.layers:
            x = b(x)
        return self.out(x)


class _Block(nn.Module):
    def __init__(self, d: int, window: int | None = None):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.window = window

    def forward(self, x):
        return x + torch.relu(self.lin(self.norm(x)))


def test_hand_written_stack_and_root_sequential():
    torch.manual_seed(0)
    _assert_same_as_full(_Stack([_Block(8) for _ in range(7)]).eval(), torch.randn(4, 8))
    _assert_same_as_full(nn.Sequential(*[_Block(8) for _ in range(4)]).eval(), torch.randn(4, 8))


def test_index_dependent_constant_is_refused():
    m = _Stack([_ScaledBlock(8, i) for i in range(5)])
    with pytest.raises(TraceError, match="constant"):
        capture(m, (torch.randn(4, 8),), method="repeat")
    cap = capture(m, (torch.randn(4, 8),))  # auto on a real model: the full capture, untouched
    assert not cap.repeated


def test_differing_config_attribute_is_refused_and_auto_falls_back_on_meta():
    blocks = [_Block(8, window=None if i % 2 else 4) for i in range(6)]
    m = _Stack(blocks)
    with pytest.raises(RepeatUnsupported, match="window"):
        find_block_list(m)
    with pytest.raises(TraceError, match="capture_method='repeat'"):
        capture(m, (torch.randn(4, 8),), method="repeat")
    meta = m.to("meta")
    cap = capture(meta, (torch.randn(4, 8, device="meta"),))
    assert not cap.repeated and any("repeat capture not used" in n for n in cap.notes)
    assert sum(1 for n in cap.gm.graph.nodes if n.op == "call_module" and ".lin" in n.target) == 6


def test_shared_block_parameters_and_short_lists_are_refused():
    shared = _Block(8)
    with pytest.raises(RepeatUnsupported, match="same block object"):
        find_block_list(_Stack([shared] * 5))
    tied = [_Block(8) for _ in range(5)]
    tied[3].lin.weight = tied[0].lin.weight
    with pytest.raises(RepeatUnsupported, match="shared"):
        find_block_list(_Stack(tied))
    with pytest.raises(RepeatUnsupported, match=">= 4"):
        find_block_list(_Stack([_Block(8) for _ in range(3)]))


transformers = pytest.importorskip("transformers")


def test_llama_export_path_matches_full_capture():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    _assert_same_as_full(LlamaForCausalLM(cfg).eval(), _tokens(100))


def test_gpt2_matches_full_capture_and_layer_scaled_gpt2_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(n_embd=32, n_layer=6, n_head=4, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0)
    _assert_same_as_full(GPT2LMHeadModel(GPT2Config(**cfg)).eval(), _tokens(100))
    scaled = GPT2LMHeadModel(GPT2Config(scale_attn_by_inverse_layer_idx=True, **cfg)).eval()
    with pytest.raises(TraceError, match="capture_method='repeat'"):
        capture(scaled, (_tokens(100),), method="repeat")


class _TwoLists(nn.Module):
    """A big list whose blocks differ in configuration, and a smaller one of identical blocks."""

    def __init__(self):
        super().__init__()
        self.small = nn.ModuleList([_Block(8) for _ in range(4)])
        self.proj = nn.Linear(8, 16)
        self.big = nn.ModuleList([_Block(16, window=i) for i in range(4)])

    def forward(self, x):
        for b in self.small:
            x = b(x)
        x = self.proj(x)
        for b in self.big:
            x = b(x)
        return x


def test_the_largest_identical_list_is_repeated():
    torch.manual_seed(0)
    m = _TwoLists().eval()
    assert find_block_list(m).path == "small"
    _assert_same_as_full(m, torch.randn(4, 8))


def test_transformers_meta_plan_compiles_the_real_model():
    """A plan made on the meta device (repeat capture) is accepted by the real model: meta's
    attention kernel returns other strides, so export records `contiguous` calls there that
    the real graph lacks; the fingerprint ignores them (they change no value)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=256)
    with torch.device("meta"):
        meta = transformers.MistralForCausalLM(cfg)
    plan = fxpipe.plan(meta, ["cpu", "cpu"], (torch.randint(0, 256, (4, 16), device="meta"),), microbatches=2)
    assert plan.capture_path == "export"
    torch.manual_seed(0)
    real = transformers.MistralForCausalLM(cfg).eval()
    x = torch.randint(0, 256, (4, 16))
    cm = fxpipe.compile(real, ["cpu", "cpu"], (x,), plan=plan)
    with torch.no_grad():
        torch.testing.assert_close(cm(x).logits, real(x).logits, rtol=1e-5, atol=1e-5)
