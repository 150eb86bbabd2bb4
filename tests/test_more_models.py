"""Models beyond the families of test_real_models.py, each pinning a bug found by trying them.

Same contract as test_equivalence.py: a `copy.deepcopy` taken before compiling is the eager
reference; outputs, the step's loss and EVERY parameter's `.grad` must equal it (fp32).

* a forward that updates a buffer in place (an EMA of its activations): fx used to run the
  buffer's in-place op once at trace time on the user's buffer (it was missing from the graph),
  and the capture check compared a graph run that started from eager's updated buffer;
* a value computed without grad (`x.detach().mean()`) sent across a stage boundary used to
  arrive as a leaf that requires grad, pulling the buffer it updates into autograd's graph;
* a dataclass output: fx recorded it as one opaque value, so `cm(x)` returned the first
  microbatch's tensors only;
* zb-h1 (split backward) over leaf modules that return tuples (nn.MultiheadAttention,
  nn.LSTM): their parameters got no gradient at all;
* an output relating samples to each other (CLIP's (batch, batch) logits_per_image) was
  concatenated from per-microbatch blocks: silently the wrong shape and values (refused with
  m > 1; test_model_zoo2.py has the exact m = 1 case);
* a model on the meta device whose inputs meet a weight directly (a convolution front end:
  Whisper, Wav2Vec2, CLIP, Swin) could not be planned with CPU example inputs;
* nn.TransformerEncoder under fx is one unit (fx keeps torch.nn modules whole): on more
  devices than units the error now names it and the way out (capture_method='export');
* a sequence-first model (nn.LSTM's default layout) split into microbatches along time ran
  silently wrong: refused now unless microbatches=1;
* a dict of tensors as one argument was reported as "example_inputs contain no tensor".
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpipe
from fxpipe import TraceError
from test_equivalence import LOSS_TOL, assert_same_grads, check_equivalence


# ---- buffers updated in forward ---------------------------------------------------------------


class EmaNet(nn.Module):
    """Subtracts a running mean of its own output, updated in forward while training."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))
        self.register_buffer("ema", torch.ones(8))  # non-zero: a lost `mul_(0.9)` shows

    def forward(self, x):
        for lin in self.ls:
            x = torch.tanh(lin(x))
        if self.training:
            self.ema.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x - self.ema


def test_buffer_updated_in_forward_is_in_the_graph_and_compile_leaves_it_alone():
    torch.manual_seed(0)
    model = EmaNet().train()
    ref = copy.deepcopy(model)
    x, t = torch.randn(6, 8), torch.randn(6, 8)
    cm = fxpipe.compile(model, ["cpu"] * 2, example_inputs=(x,), microbatches=1)
    assert cm.plan.capture_path == "fx"
    torch.testing.assert_close(model.ema, torch.ones(8))  # tracing and checking ran nothing on it
    assert "mul_" in cm._cap.gm.code  # the decay is part of the graph, not done once at trace time
    for _ in range(2):  # the second step starts from the buffer the first one left
        loss = cm.step(x, target=t, loss_fn=F.mse_loss)
        ref_loss = F.mse_loss(ref(x), t)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
        torch.testing.assert_close(model.ema, ref.ema)
    assert_same_grads(model, ref)


class EarlyStatNet(nn.Module):
    """A statistic taken without grad at the input, used only by the last op: every cut of a
    2-stage pipeline carries it across the boundary."""

    def __init__(self):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.register_buffer("ema", torch.ones(8))

    def forward(self, x):
        stat = x.detach().mean(0) * 0.1
        for lin in self.ls:
            x = torch.tanh(lin(x))
        if self.training:  # as BatchNorm's statistics: per microbatch, once per microbatch
            self.ema.mul_(0.9).add_(stat)
        return x - self.ema  # sub saves nothing: microbatches may update the buffer before a backward


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_value_sent_without_grad_arrives_without_grad(schedule):
    torch.manual_seed(0)
    model = EarlyStatNet().train()
    ref = copy.deepcopy(model)
    x, t = torch.randn(6, 8), torch.randn(6, 8)
    cm = fxpipe.compile(model, ["cpu"] * 2, example_inputs=(x,), microbatches=2, schedule=schedule)
    for _ in range(2):
        loss = cm.step(x, target=t, loss_fn=F.mse_loss)
        # eager over the same microbatches in order: the buffer is updated once per microbatch
        ref_loss = sum(F.mse_loss(ref(xm), tm) * (len(xm) / len(x))
                       for xm, tm in zip(torch.tensor_split(x, 2), torch.tensor_split(t, 2)))
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
        assert not model.ema.requires_grad and model.ema.grad_fn is None
        torch.testing.assert_close(model.ema, ref.ema)
    assert_same_grads(model, ref)


# ---- dataclass outputs ------------------------------------------------------------------------


@dataclasses.dataclass
class PairOut:
    main: torch.Tensor
    aux: torch.Tensor


torch.export.register_dataclass(PairOut)


@dataclasses.dataclass
class UnregisteredOut:
    main: torch.Tensor


class PairNet(nn.Module):
    def __init__(self, out_cls=PairOut):
        super().__init__()
        self.out_cls = out_cls
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        for lin in self.ls:
            x = torch.tanh(lin(x))
        if self.out_cls is PairOut:
            return PairOut(main=x, aux=x.sum(-1))
        return self.out_cls(main=x)


@pytest.mark.parametrize("p", [2, 4])
def test_registered_dataclass_output_is_concatenated_over_microbatches(p):
    torch.manual_seed(0)
    model = PairNet()
    x, t = torch.randn(6, 8), torch.randn(6, 8)
    cm, _ = check_equivalence(model, p, 3, "1f1b", (x,), t, lambda o, tt: F.mse_loss(o.main, tt) + o.aux.mean())
    assert cm.plan.capture_path == "fx"
    out = cm(x)
    assert type(out) is PairOut and out.main.shape == (6, 8) and out.aux.shape == (6,)


def test_unregistered_dataclass_output_is_a_trace_error_naming_the_fix():
    with pytest.raises(TraceError, match=r"UnregisteredOut.*register_dataclass"):
        fxpipe.compile(PairNet(UnregisteredOut), ["cpu"] * 2, example_inputs=(torch.randn(6, 8),))


# ---- split backward over leaf modules returning tuples ----------------------------------------


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a1 = nn.MultiheadAttention(16, 4, batch_first=True)
        self.lin = nn.Linear(16, 16)
        self.a2 = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        x = x + self.a1(x, x, x, need_weights=False)[0]
        x = torch.relu(self.lin(x))
        return x + self.a2(x, x, x)[0]


class RnnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.rnn = nn.LSTM(16, 16, num_layers=2, batch_first=True)
        self.l1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.head(torch.relu(self.l1(h[:, -1])))


@pytest.mark.parametrize("p", [2, 4])
def test_zero_bubble_gives_multihead_attention_its_gradients(p):
    torch.manual_seed(0)
    x, t = torch.randn(6, 5, 16), torch.randn(6, 5, 16)
    check_equivalence(AttnNet(), p, 3, "zb-h1", (x,), t, F.mse_loss)


def test_zero_bubble_gives_lstm_its_gradients():
    torch.manual_seed(0)
    x = torch.randint(0, 50, (6, 7))
    x[:, :2] = 0  # padding_idx rows: their embedding gradient stays zero
    check_equivalence(RnnNet(), 2, 3, "zb-h1", (x,), torch.randint(0, 5, (6,)), F.cross_entropy)


# ---- outputs that relate samples to each other ------------------------------------------------


def test_output_mixing_samples_is_a_trace_error_not_a_wrong_concatenation():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4), projection_dim=8)
    inputs = {"input_ids": torch.randint(2, 64, (4, 6)), "pixel_values": torch.randn(4, 3, 8, 8)}
    with pytest.raises(fxpipe.PlanError, match=r"CLIPModel .*output \['logits_per_image'\] .*\(2, 2\).*\(1, 1\)"
                                               r".*microbatches=1"):
        fxpipe.compile(transformers.CLIPModel(cfg).eval(), ["cpu"] * 2, example_inputs=inputs, microbatches=2)


# ---- meta-device models with a convolution front end ------------------------------------------


class ConvFront(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)
        if h.shape[1] > 1:  # control flow on a shape: fx cannot trace it, export can
            h = h * 2
        for lin in self.ls:
            h = torch.tanh(lin(h))
        return h


def test_meta_model_with_cpu_inputs_meeting_a_weight_plans_like_the_real_model():
    x = torch.randn(6, 4, 5)
    with torch.device("meta"):
        on_meta = ConvFront()
    plan = fxpipe.plan(on_meta, ["cpu"] * 2, example_inputs=(x,), microbatches=2)
    real = fxpipe.plan(ConvFront(), ["cpu"] * 2, example_inputs=(x,), microbatches=2)
    assert plan.capture_path == real.capture_path == "export"
    assert [s.units for s in plan.stages] == [s.units for s in real.stages]
    assert plan.costs.unit_names == real.costs.unit_names


# ---- torch.nn containers fx keeps whole -------------------------------------------------------


class EncoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.enc(x))


def test_too_few_units_names_the_whole_torch_nn_module_and_export_splits_it():
    torch.manual_seed(0)
    x, t = torch.randn(6, 5, 16), torch.randn(6, 5, 4)
    with pytest.raises(fxpipe.PlanError, match=r"2 units \(enc, head\).*enc \(TransformerEncoder\).*capture_method='export'"):
        fxpipe.compile(EncoderNet().train(), ["cpu"] * 4, example_inputs=(x,))
    model = EncoderNet().train()
    ref = copy.deepcopy(model)
    cm = fxpipe.compile(model, ["cpu"] * 4, example_inputs=(x,), microbatches=2, capture_method="export")
    assert cm.plan.num_stages == 4
    loss = cm.step(x, target=t, loss_fn=F.mse_loss)
    ref_loss = F.mse_loss(ref(x), t)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
    assert_same_grads(model, ref)


# ---- sequence-first models --------------------------------------------------------------------


class SeqFirstNet(nn.Module):
    """nn.LSTM's default layout: input (seq, batch, features), so dim 0 is time, not the batch."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 8)
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        h, _ = self.rnn(x)
        for lin in self.ls:
            h = torch.tanh(lin(h))
        return h


def test_sequence_first_model_is_refused_with_microbatches_and_exact_without():
    torch.manual_seed(0)
    x, t = torch.randn(6, 4, 8), torch.randn(6, 4, 8)  # 6 time steps of 4 samples
    with pytest.raises(fxpipe.PlanError, match=r"SeqFirstNet does not compute the samples along dim 0 "
                                               r"independently.*batch_first=True.*microbatches=1"):
        fxpipe.compile(SeqFirstNet(), ["cpu"] * 2, example_inputs=(x,), microbatches=2)
    # one microbatch splits nothing: the pipeline is exact, and the check leaves the model alone
    check_equivalence(SeqFirstNet().train(), 2, 1, "1f1b", (x,), t, F.mse_loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sample_independence_check_in_16_bits(dtype):
    """In 16 bits batch 1 and batch 2 round differently (ulps that compound over layers): a
    deep batch-first model must still compile, a sequence-first one must still be refused."""
    torch.manual_seed(0)
    deep = nn.Sequential(*[nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(12)])
    x = torch.randn(8, 64)
    cm = fxpipe.compile(deep.to(dtype), ["cpu"] * 2, example_inputs=(x.to(dtype),), microbatches=4)
    assert cm.plan.microbatches == 4
    with pytest.raises(fxpipe.PlanError, match="does not compute the samples along dim 0 independently"):
        fxpipe.compile(SeqFirstNet().to(dtype), ["cpu"] * 2, example_inputs=(torch.randn(6, 4, 8, dtype=dtype),),
                       microbatches=2)


# ---- tensors nested in an argument ------------------------------------------------------------


class NestedInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, batch):
        x = batch["a"] + batch["b"]
        for lin in self.ls:
            x = torch.tanh(lin(x))
        return x


def test_tensors_nested_in_an_argument_are_a_trace_error_naming_the_argument():
    # was: "example_inputs contain no tensor", of an input holding two
    batch = {"a": torch.randn(6, 8), "b": torch.randn(6, 8)}
    with pytest.raises(TraceError, match=r"NestedInputNet.forward argument\(s\) 'batch' hold tensors inside a dict"):
        fxpipe.compile(NestedInputNet(), ["cpu"] * 2, example_inputs=(batch,))
