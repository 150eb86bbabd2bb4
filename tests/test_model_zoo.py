"""Model families and input styles beyond test_real_models.py / test_more_models.py.

Same contract: a `copy.deepcopy` taken before compiling is the eager reference; `cm(...)`,
the step's loss and EVERY parameter's `.grad` (by name) must equal it in fp32, or the model is
refused up front with a typed fxpipe error that names the reason and the fix. Each case pins
a bug found by trying it:

* nn.TransformerEncoder in eval() with src_key_padding_mask: its fast path asks an op with no
  meta kernel whether the mask is left aligned, so shape propagation failed; under export the
  graph follows the gradient path while eager's no_grad output zeroes padded positions, which
  was reported as "the trace specialised on the example batch";
* `with torch.no_grad():` inside forward: fx does not record it, so the branch's parameters got
  gradients eager never gives (silently); now fx's graph is refused and export taken;
* a custom torch.autograd.Function (gradient reversal): fx and export traced its forward and
  dropped its backward (silently wrong gradients); fx now keeps the call, export is refused
  unless the Function's gradients equal its forward's (BLOOM's GeLUFunction: bloom_alibi);
* a reentrant torch.utils.checkpoint under export: recorded as a grad-disabled region, the
  step failed with a misleading "output does not require grad"; refused at capture now;
* a complex tensor cut between stages (rotary as view_as_complex): the receiver did not make
  it a leaf requiring grad, so the first stage's parameters silently got no gradient;
* a 0-d tensor input (a temperature): the capture checks sliced it like a batch (IndexError);
* a 0-d output that is a sum over the batch was averaged over microbatches (silently half);
* transformers 5 arguments that land in `**kwargs` (output_hidden_states, return_dict) made
  torch.export reject its own dynamic_shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from torch import nn

import fxpipe
from fxpipe import PlanError, TraceError
from test_equivalence import LOSS_TOL, assert_same_grads, assert_same_output

B = 6


def run(model, inputs, target, loss_fn, p=2, m=2, schedule="1f1b", **kw):
    """Compile over p CPU workers; check inference, loss and every gradient against eager."""
    ref = copy.deepcopy(model)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    cm = fxpipe.compile(model, ["cpu"] * p, example_inputs=args or kwargs, microbatches=m, schedule=schedule, **kw)
    with torch.no_grad():
        want = ref(*args, **kwargs)
    assert_same_output(cm(*args, **kwargs), want)
    loss = cm.step(*args, target=target, loss_fn=loss_fn, **kwargs)
    ref_loss = loss_fn(ref(*args, **kwargs), target)
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **LOSS_TOL)
    assert_same_grads(model, ref)
    return cm


def first_mse(out, t):
    return F.mse_loss(out[0] if isinstance(out, (tuple, list)) else out, t)


# ---- nn.TransformerEncoder with a padding mask -------------------------------------------------


class PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32, padding_idx=0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 3)  # enable_nested_tensor=True: the fast path
        self.head = nn.Linear(32, 8)

    def forward(self, ids, pad):
        return self.head(self.enc(self.emb(ids), src_key_padding_mask=pad))


def _padded_encoder():
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (B, 10))
    pad = torch.zeros(B, 10, dtype=torch.bool)
    pad[:3, 7:] = True
    ids[pad] = 0
    return PaddedEncoder().eval(), (ids, pad), torch.randn(B, 10, 8)


def test_transformer_encoder_eval_padding_mask_fx():
    """fx keeps the encoder whole: its no_grad fast path (padded positions zeroed) runs in
    inference, the gradient path in step, as in eager."""
    model, inputs, t = _padded_encoder()
    cm = run(model, inputs, t, first_mse)
    assert cm.plan.capture_path == "fx"


def test_transformer_encoder_eval_padding_mask_export_refused_then_fast_path_off():
    model, inputs, t = _padded_encoder()
    with pytest.raises(TraceError, match=r"differently under torch.no_grad.*set_fastpath_enabled\(False\)"):
        fxpipe.compile(model, ["cpu"] * 4, example_inputs=inputs, microbatches=2, capture_method="export")
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        cm = run(model, inputs, t, first_mse, p=4, capture_method="export")
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    assert cm.plan.num_stages == 4


# ---- gradient structure the value check cannot see ------------------------------------------------


class NoGradBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.t, self.c = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        h = torch.relu(self.a(x))
        with torch.no_grad():
            teacher = self.t(h)  # eager: no gradient to t, none to a through this branch
        return self.c(torch.relu(self.b(h)) + teacher)


def test_no_grad_region_in_forward_is_not_trained():
    torch.manual_seed(0)
    model = NoGradBranch()
    cm = run(model, (torch.randn(B, 8),), torch.randn(B, 8), F.mse_loss)
    assert cm.plan.capture_path == "export"  # fx's graph was refused: it trains t
    assert model.t.weight.grad is None or not model.t.weight.grad.any()


class Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -0.5 * g


class GradReversal(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        h = Reverse.apply(torch.relu(self.a(x)))
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_custom_autograd_function_keeps_its_backward(schedule):
    torch.manual_seed(0)
    cm = run(GradReversal(), (torch.randn(B, 8),), torch.randn(B, 8), F.mse_loss, m=3, schedule=schedule)
    assert cm.plan.capture_path == "fx"


def test_custom_autograd_function_under_export_is_refused():
    with pytest.raises(TraceError, match="custom torch.autograd.Function Reverse"):
        fxpipe.compile(GradReversal(), ["cpu"] * 2, example_inputs=(torch.randn(B, 8),), microbatches=2,
                       capture_method="export")


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.ls = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)) for _ in range(4))
        self.reentrant = reentrant

    def forward(self, x):
        x = self.inp(x)
        for i, blk in enumerate(self.ls):
            x = x + (ckpt.checkpoint(blk, x, use_reentrant=self.reentrant) if i % 2 else blk(x))
        return x


def test_reentrant_checkpoint():
    torch.manual_seed(0)
    x, t = torch.randn(B, 8), torch.randn(B, 8)
    run(Checkpointed(True), (x,), t, F.mse_loss, p=4, m=3)  # fx: traced through, same gradients
    run(Checkpointed(False), (x,), t, F.mse_loss, capture_method="export")
    with pytest.raises(TraceError, match=r"no gradient to parameters eager trains.*use_reentrant=False"):
        fxpipe.compile(Checkpointed(True), ["cpu"] * 2, example_inputs=(x,), microbatches=2, capture_method="export")


# ---- values and inputs of other kinds ------------------------------------------------------------


class ComplexRotary(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.o, self.l2 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        t = torch.arange(10).float()[:, None] * torch.linspace(0.1, 1, 8)[None]
        self.register_buffer("freqs", torch.polar(torch.ones_like(t), t))

    def forward(self, x):
        q = self.q(x)
        qc = torch.view_as_complex(q.reshape(*q.shape[:-1], 8, 2))
        q = torch.view_as_real(qc * self.freqs[: x.shape[1]]).flatten(-2)
        return self.l2(torch.relu(self.o(q)))


@pytest.mark.parametrize("p, schedule", [(4, "1f1b"), (2, "zb-h1")])
def test_complex_values_crossing_a_stage_boundary_carry_gradient(p, schedule):
    torch.manual_seed(0)
    cm = run(ComplexRotary(), (torch.randn(B, 10, 16),), torch.randn(B, 10, 16), F.mse_loss, p=p, m=3,
             schedule=schedule)  # run() compares outputs, loss and every gradient with eager
    assert cm.plan.num_stages == p


class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x, temp):
        for lin in self.ls:
            x = torch.tanh(lin(x))
        logits = x / temp
        return [logits, logits.argmax(-1), logits > 0, None]


def test_zero_dim_input_and_list_output_with_int_bool_none():
    torch.manual_seed(0)
    cm = run(Tempered(), (torch.randn(B, 8), torch.tensor(0.5)), torch.randn(B, 8), first_mse, p=4, m=3)
    out = cm(torch.randn(B, 8), torch.tensor(0.5))
    assert out[1].dtype == torch.int64 and out[2].dtype == torch.bool and out[3] is None


class SummedPenalty(nn.Module):
    def __init__(self):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        for lin in self.ls:
            x = torch.tanh(lin(x))
        return x, x.pow(2).sum(), x.pow(2).mean()


def test_zero_dim_output_that_is_a_batch_sum_is_refused():
    with pytest.raises(PlanError, match=r"0-d output \[1\].*is not a mean"):
        fxpipe.compile(SummedPenalty(), ["cpu"] * 2, example_inputs=(torch.randn(B, 8),), microbatches=2)
    # with one microbatch nothing is combined; and the mean ([2]) alone is fine
    torch.manual_seed(0)
    run(SummedPenalty(), (torch.randn(B, 8),), torch.randn(B, 8), first_mse, m=1)


# ---- transformers ------------------------------------------------------------------------------

VOCAB, SEQ = 128, 12


def _ids(batch=4, low=3):
    return torch.randint(low, VOCAB, (batch, SEQ))


def _mask(batch=4):
    am = torch.ones(batch, SEQ, dtype=torch.long)
    am[:2, SEQ - 3:] = 0
    return am


def lm_loss(out, t):
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(logits.flatten(0, 1), t.flatten())


def cls_loss(out, t):
    return F.cross_entropy(out.logits, t)


def test_qwen2_arguments_in_var_kwargs():
    """output_hidden_states / return_dict reach Qwen2ForCausalLM.forward through **kwargs."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0, use_cache=False)
    ids = _ids(5)  # 5 samples over 2 microbatches: uneven
    run(T.Qwen2ForCausalLM(cfg).eval(), {"input_ids": ids, "attention_mask": _mask(5), "output_hidden_states": True},
        ids, lm_loss)
    cm = run(T.Qwen2ForCausalLM(cfg).eval(), {"input_ids": ids, "return_dict": False}, ids, lm_loss)
    assert isinstance(cm(input_ids=ids, return_dict=False), tuple)  # the flag reached forward


def _albert():
    T = pytest.importorskip("transformers")
    cfg = T.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = _ids()
    return T.AlbertForMaskedLM(cfg).eval(), {"input_ids": ids, "attention_mask": _mask()}, ids, lm_loss


def _distilbert():
    T = pytest.importorskip("transformers")
    cfg = T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=32,
                             dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3)
    return (T.DistilBertForSequenceClassification(cfg).eval(), {"input_ids": _ids(), "attention_mask": _mask()},
            torch.randint(0, 3, (4,)), cls_loss)


def _bloom():
    T = pytest.importorskip("transformers")
    cfg = T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=4, n_head=4, hidden_dropout=0.0,
                        attention_dropout=0.0, use_cache=False)
    ids = _ids()
    return T.BloomForCausalLM(cfg).eval(), {"input_ids": ids, "attention_mask": _mask()}, ids, lm_loss


def _bart():
    T = pytest.importorskip("transformers")
    cfg = T.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                       eos_token_id=2, decoder_start_token_id=2, use_cache=False)
    dec = _ids()[:, :8]
    return (T.BartForConditionalGeneration(cfg).eval(),
            {"input_ids": _ids(), "attention_mask": _mask(), "decoder_input_ids": dec}, dec, lm_loss)


ZOO = [("albert_mlm_shared_layers", _albert, 4, "1f1b"), ("distilbert", _distilbert, 2, "zb-h1"),
       ("bloom_alibi", _bloom, 2, "gpipe"), ("bart", _bart, 2, "1f1b")]


@pytest.mark.parametrize("make, p, schedule", [z[1:] for z in ZOO], ids=[z[0] for z in ZOO])
def test_transformers_zoo(make, p, schedule):
    torch.manual_seed(0)
    model, inputs, target, loss_fn = make()
    cm = run(model, inputs, target, loss_fn, p=p, schedule=schedule)
    assert cm.plan.num_stages == p
