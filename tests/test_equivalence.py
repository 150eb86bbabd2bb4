"""End-to-end equivalence: a compiled pipeline computes exactly what the untouched model does.

Every case keeps a `copy.deepcopy` of the model *before* compiling (compile may move or share
parameters), then checks, in fp32:

* inference: `cm(*args)` equals `ref(*args)` (same structure, rtol 1e-4, atol 1e-5);
* training: `cm.step(..., target=t, loss_fn=f)` returns the eager loss and leaves on EVERY
  parameter (matched by name) the `.grad` that `f(ref(*args), t).backward()` leaves.

The microbatch contract (DESIGN.md) makes this exact even when the batch does not divide
into the microbatch count: each microbatch's mean loss is weighted by its share.

The transformers models are costly to capture, so they are not run over the full
(devices x schedule x microbatches) cross product; the cheap MLP is.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

import fxpipe
from fxpipe import PlanError

OUT_TOL = dict(rtol=1e-4, atol=1e-5)
LOSS_TOL = dict(rtol=1e-4, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


# ---- helpers ---------------------------------------------------------------------------------


def _leaves(value):
    """Comparable (path, tensor-or-value) pairs of a model output (tensor, tuple, dict, ModelOutput)."""
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # transformers ModelOutput
        value = {k: value[k] for k in value.keys()}
    flat, spec = pytree.tree_flatten_with_path(value)
    return [(pytree.keystr(p), v) for p, v in flat], spec


def assert_same_output(got, want, tol=OUT_TOL):
    assert type(got) is type(want), f"output type {type(got).__name__}, eager gives {type(want).__name__}"
    g, gspec = _leaves(got)
    w, wspec = _leaves(want)
    assert [p for p, _ in g] == [p for p, _ in w], f"output structure {gspec} != eager {wspec}"
    for (path, a), (_, b) in zip(g, w):
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor), path
            assert a.shape == b.shape and a.dtype == b.dtype, (path, a.shape, b.shape, a.dtype, b.dtype)
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"output {path}: {m}")
        else:
            assert a == b, path


def assert_same_grads(model, ref, tol=GRAD_TOL):
    """Every parameter of the compiled model has eager's gradient (by name, duplicates included)."""
    got = dict(model.named_parameters(remove_duplicate=False))
    want = dict(ref.named_parameters(remove_duplicate=False))
    assert got.keys() == want.keys()
    missing, wrong = [], []
    for name, w in want.items():
        g = got[name]
        if w.grad is None:
            assert g.grad is None or torch.count_nonzero(g.grad) == 0, f"{name}: grad where eager has none"
            continue
        if g.grad is None:
            missing.append(name)
            continue
        if not torch.allclose(g.grad.cpu(), w.grad, **tol):
            wrong.append(f"{name} (max abs diff {(g.grad.cpu() - w.grad).abs().max().item():.3g})")
    assert not missing, f"parameters without .grad after step: {missing}"
    assert not wrong, f"parameters whose .grad differs from eager: {wrong}"


def check_equivalence(model, p, m, schedule, args, target, loss_fn, kwargs=None):
    """Compile `model` over p CPU devices and check outputs, loss and every gradient against eager."""
    kwargs = kwargs or {}
    ref = copy.deepcopy(model)
    cm = fxpipe.compile(model, ["cpu"] * p, example_inputs=args, example_kwargs=kwargs,
                        microbatches=m, schedule=schedule)
    assert cm.plan.num_stages == p
    assert cm.plan.microbatches == m
    with torch.no_grad():
        want = ref(*args, **kwargs)
    assert_same_output(cm(*args, **kwargs), want)

    loss = cm.step(*args, target=target, loss_fn=loss_fn, **kwargs)
    ref_loss = loss_fn(ref(*args, **kwargs), target)
    ref_loss.backward()
    assert loss.shape == ()
    torch.testing.assert_close(loss.detach().cpu(), ref_loss.detach(), **LOSS_TOL)
    assert_same_grads(model, ref)
    return cm, ref


def mse(out, t):
    return F.mse_loss(out, t)


def lm_loss(logits, t):
    return F.cross_entropy(logits.flatten(0, 1), t.flatten())


# ---- models ----------------------------------------------------------------------------------


def make_mlp():
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(),
        nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, 32), nn.GELU(),
        nn.Linear(32, 8),
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written out by hand (no F.scaled_dot_product_attention)."""

    def __init__(self, d: int, heads: int, max_len: int):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.size(0), x.size(1), x.size(2)
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(b, t, self.heads, self.dh).transpose(1, 2)
        k = k.view(b, t, self.heads, self.dh).transpose(1, 2)
        v = v.view(b, t, self.heads, self.dh).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.dh))
        causal = torch.ones_like(att[0, 0], dtype=torch.bool).tril()  # (t, t), built in-graph: fx-traceable
        att = att.masked_fill(~causal, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class PreLNBlock(nn.Module):
    def __init__(self, d: int, heads: int, max_len: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, max_len)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Embeddings, a stack of pre-LN blocks, final LayerNorm, LM head (optionally tied)."""

    def __init__(self, vocab=64, d=32, heads=4, layers=4, max_len=16, tie=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(PreLNBlock(d, heads, max_len) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, idx):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class SkipNet(nn.Module):
    """The first block's output is read again by the last block: it must ride through the middle."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 32)
        self.mid = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(4)])
        self.last = SkipHead()

    def forward(self, x):
        h0 = torch.relu(self.first(x))
        return self.last(self.mid(h0), h0)


class SkipHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 8)

    def forward(self, h, skip):
        return self.proj(h * 0.5 + skip)


class MaskedNet(nn.Module):
    """Two tensor inputs, the second keyword-only (a boolean mask read by the first and last block)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.c = nn.Linear(32, 16)

    def forward(self, x, *, mask):
        h = self.a(x).masked_fill(~mask, 0.0)
        h = self.b(h)
        return self.c(h).masked_fill(~mask[:, :16], -1.0)


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)
        self.aux = nn.Linear(32, 2)

    def forward(self, x):
        h = self.enc(x)
        return {"logits": self.head(h), "aux": self.aux(h), "hidden": h}


class TupleNet(DictNet):
    def forward(self, x):
        h = self.enc(x)
        return self.head(h), self.aux(h)


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    # use_cache=False: fxpipe drops the KV cache from outputs (no pipeline wants it), so the
    # reference must not return one either
    cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, use_cache=False,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    return GPT2LMHeadModel(cfg).eval()


def make_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg).eval()


def gpt2_loss(out, t):
    return lm_loss(out.logits, t)


def vit_loss(out, t):
    return F.cross_entropy(out.logits, t)


# ---- MLP: the full cross product is cheap ----------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_mlp(p, schedule, m):
    x, t = torch.randn(8, 16), torch.randn(8, 8)
    check_equivalence(make_mlp(), p, m, schedule, (x,), t, mse)


@pytest.mark.parametrize("p, schedule", [(1, "gpipe"), (2, "1f1b"), (3, "gpipe"), (4, "1f1b")])
def test_mlp_batch_not_divisible(p, schedule):
    """batch 7 in 3 microbatches (3, 2, 2): per-microbatch means weighted by share = full-batch mean."""
    x, t = torch.randn(7, 16), torch.randn(7, 8)
    check_equivalence(make_mlp(), p, 3, schedule, (x,), t, mse)


def test_mlp_call_with_other_batch_size():
    """Only the batch size may change after compiling; a 5-sample batch in 4 microbatches (2,1,1,1)."""
    model = make_mlp()
    ref = copy.deepcopy(model)
    cm = fxpipe.compile(model, ["cpu"] * 2, example_inputs=(torch.randn(8, 16),), microbatches=4, schedule="1f1b")
    x, t = torch.randn(5, 16), torch.randn(5, 8)
    with torch.no_grad():
        assert_same_output(cm(x), ref(x))
    loss = cm.step(x, target=t, loss_fn=mse)
    ref_loss = mse(ref(x), t)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
    assert_same_grads(model, ref)


def test_more_microbatches_than_samples_is_a_plan_error():
    with pytest.raises(PlanError, match="microbatch"):
        fxpipe.compile(make_mlp(), ["cpu"] * 2, example_inputs=(torch.randn(3, 16),), microbatches=4)
    cm = fxpipe.compile(make_mlp(), ["cpu"] * 2, example_inputs=(torch.randn(8, 16),), microbatches=4)
    with pytest.raises(PlanError, match="microbatch"):
        cm(torch.randn(3, 16))
    with pytest.raises(PlanError, match="microbatch"):
        cm.step(torch.randn(2, 16), target=torch.randn(2, 8), loss_fn=mse)


def test_grads_accumulate_like_eager():
    """Two steps without zero_grad: .grad accumulates, as `loss.backward()` twice does."""
    model = make_mlp()
    ref = copy.deepcopy(model)
    cm = fxpipe.compile(model, ["cpu"] * 3, example_inputs=(torch.randn(8, 16),), microbatches=4)
    for _ in range(2):
        x, t = torch.randn(8, 16), torch.randn(8, 8)
        cm.step(x, target=t, loss_fn=mse)
        mse(ref(x), t).backward()
    assert_same_grads(model, ref)


# ---- hand-written pre-LN transformer (fx path) -----------------------------------------------


@pytest.mark.parametrize("p, schedule, m, batch", [
    (1, "1f1b", 2, 6),
    (2, "gpipe", 4, 8),
    (2, "1f1b", 3, 7),
    (3, "1f1b", 8, 8),
    (4, "gpipe", 3, 7),
    (4, "1f1b", 1, 4),
])
def test_tiny_transformer(p, schedule, m, batch):
    idx = torch.randint(0, 64, (batch, 16))
    t = torch.randint(0, 64, (batch, 16))
    cm, _ = check_equivalence(TinyLM(), p, m, schedule, (idx,), t, lm_loss)
    assert cm.plan.capture_path == "fx"


@pytest.mark.parametrize("p, schedule", [(2, "gpipe"), (3, "1f1b")])
def test_tiny_transformer_tied_head(p, schedule):
    """Tied embedding/head through fx call_module nodes: the head's module is replicated, its
    gradient summed into the one shared parameter."""
    model = TinyLM(tie=True)
    idx, t = torch.randint(0, 64, (6, 16)), torch.randint(0, 64, (6, 16))
    check_equivalence(model, p, 3, schedule, (idx,), t, lm_loss)
    assert model.head.weight is model.tok.weight


# ---- GPT-2 (torch.export path, tied embedding) -----------------------------------------------


GPT2_CASES = [  # every device count with both schedules; m from 1 to 8; batches that do not divide
    (1, "gpipe", 2, 4),
    (1, "1f1b", 1, 3),
    (2, "1f1b", 4, 8),
    (2, "gpipe", 3, 5),
    (3, "gpipe", 3, 7),
    (3, "1f1b", 2, 4),
    (4, "1f1b", 8, 8),
    (4, "gpipe", 4, 6),
]


@pytest.mark.parametrize("p, schedule, m, batch", GPT2_CASES)
def test_gpt2(p, schedule, m, batch):
    model = make_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 128, (batch, 16))
    cm, ref = check_equivalence(model, p, m, schedule, (idx,), idx, gpt2_loss)
    # the tie survives compilation, and the shared parameter got the sum of both uses
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, **GRAD_TOL)
    ids = [id(q) for q in cm.parameters()]
    assert len(ids) == len(set(ids)) == len(list(ref.parameters()))


def test_gpt2_state_dict_keys_and_two_adamw_steps():
    """state_dict has the original keys; after an AdamW update the second step still matches
    eager (the tied head's replica must be re-synced from the updated embedding)."""
    model = make_gpt2()
    ref = copy.deepcopy(model)
    # the second step also changes the batch size (6 -> 5): only dim 0 may change after compiling
    idx1, idx2 = torch.randint(0, 128, (6, 16)), torch.randint(0, 128, (5, 16))
    cm = fxpipe.compile(model, ["cpu"] * 3, example_inputs=(idx1,), microbatches=3, schedule="1f1b")
    assert list(cm.state_dict().keys()) == list(ref.state_dict().keys())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(cm.state_dict()[k], v, rtol=0, atol=0)
    assert [n for n, _ in cm.named_parameters()] == [n for n, _ in ref.named_parameters()]
    # the tied weight is read by the first and the last stage: a replica that must be re-synced
    tied = {"lm_head.weight", "transformer.wte.weight"}
    assert tied & set(cm.stage_graphs[0].attrs) and tied & set(cm.stage_graphs[-1].attrs)

    opt = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for idx in (idx1, idx2):
        loss = cm.step(idx, target=idx, loss_fn=gpt2_loss)
        ref_loss = gpt2_loss(ref(idx), idx)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
        assert_same_grads(model, ref)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    # Adam normalises each gradient element, so a last-ulp difference in a near-zero gradient can
    # move a parameter by a sizeable fraction of lr: parameters are compared to lr / 100.
    for (n, a), (_, b) in zip(cm.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        assert_same_output(cm(idx2), ref(idx2))


def test_gpt2_with_attention_mask():
    """The everyday transformers call: input_ids plus a padding attention_mask read by every block."""
    idx = torch.randint(0, 128, (6, 16))
    am = torch.ones(6, 16, dtype=torch.long)
    am[:2, 12:] = 0
    cm, _ = check_equivalence(make_gpt2(), 2, 3, "1f1b", (idx,), idx, gpt2_loss, kwargs={"attention_mask": am})
    assert all("attention_mask" not in sg.send for sg in cm.stage_graphs)


# ---- ViT (transformers, image input) ---------------------------------------------------------


@pytest.mark.parametrize("p, schedule, m, batch", [(2, "gpipe", 2, 4), (3, "1f1b", 3, 5), (4, "1f1b", 2, 4)])
def test_vit(p, schedule, m, batch):
    x = torch.randn(batch, 3, 16, 16)
    t = torch.randint(0, 5, (batch,))
    check_equivalence(make_vit(), p, m, schedule, (x,), t, vit_loss)


# ---- boundaries, inputs and output structures ------------------------------------------------


@pytest.mark.parametrize("p, schedule", [(3, "gpipe"), (4, "1f1b")])
def test_skip_connection_forwarded_through_middle_stages(p, schedule):
    x, t = torch.randn(8, 16), torch.randn(8, 8)
    cm, _ = check_equivalence(SkipNet(), p, 4, schedule, (x,), t, mse)
    sgs = cm.stage_graphs
    # the skip value (relu of the first block) is produced in stage 0 and read in the last
    skip = next(n for n in sgs[0].send if n.startswith("relu"))
    assert skip in sgs[-1].recv
    for mid in sgs[1:-1]:
        assert skip in mid.recv and skip in mid.send, (mid.index, mid.recv, mid.send)


@pytest.mark.parametrize("p, schedule, m", [(2, "1f1b", 4), (3, "gpipe", 3)])
def test_keyword_only_mask_input(p, schedule, m):
    batch = 6
    x = torch.randn(batch, 16)
    mask = torch.rand(batch, 32) > 0.3
    t = torch.randn(batch, 16)
    cm, _ = check_equivalence(MaskedNet(), p, m, schedule, (x,), t, mse, kwargs={"mask": mask})
    assert cm.plan.input_names == ("x", "mask")
    # the mask is a model input: handed to the stages that read it, never sent over a link
    assert "mask" in cm.stage_graphs[0].model_inputs and "mask" in cm.stage_graphs[-1].model_inputs
    assert all("mask" not in sg.send for sg in cm.stage_graphs)


class FewModules(nn.Module):
    """Six compute nodes but only two submodules: four stages need units finer than modules."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.tanh(h * 2)
        return self.b(h) + 1


def test_more_devices_than_modules_uses_node_units():
    x, t = torch.randn(8, 16), torch.randn(8, 8)
    check_equivalence(FewModules(), 4, 2, "gpipe", (x,), t, mse)


def test_dict_output():
    x, t = torch.randn(8, 16), torch.randint(0, 4, (8,))

    def loss_fn(out, t):
        return F.cross_entropy(out["logits"], t) + out["aux"].pow(2).mean() + 0.1 * out["hidden"].mean()

    cm, _ = check_equivalence(DictNet(), 3, 4, "1f1b", (x,), t, loss_fn)
    out = cm(x)
    assert type(out) is dict and list(out) == ["logits", "aux", "hidden"]


def test_tuple_output():
    x, t = torch.randn(7, 16), torch.randint(0, 4, (7,))

    def loss_fn(out, t):
        logits, aux = out
        return F.cross_entropy(logits, t) + aux.abs().mean()

    cm, _ = check_equivalence(TupleNet(), 2, 3, "gpipe", (x,), t, loss_fn)
    assert type(cm(x)) is tuple and len(cm(x)) == 2


def test_state_dict_keys_equal_original_tied_model():
    model = TinyLM(tie=True)
    ref = copy.deepcopy(model)
    cm = fxpipe.compile(model, ["cpu"] * 3, example_inputs=(torch.randint(0, 64, (4, 16)),), microbatches=2)
    assert list(cm.state_dict().keys()) == list(ref.state_dict().keys())


# ---- generated programs ----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_code_shows_each_device_program(schedule):
    p, m = 3, 4
    cm = fxpipe.compile(make_mlp(), ["cpu"] * p, example_inputs=(torch.randn(8, 16),), microbatches=m,
                        schedule=schedule)
    for d in range(p):
        src = cm.code(d)
        assert f"def device_{d}(rt):" in src
        for mb in range(m):
            assert f"rt.forward({d}, {mb})  # F(s{d},mb{mb})" in src
            assert f"rt.backward({d}, {mb})  # B(s{d},mb{mb})" in src
            if d > 0:
                assert f"# RECV_ACT(s{d},mb{mb}<-d{d - 1})" in src
                assert f"# SEND_GRAD(s{d},mb{mb}->d{d - 1})" in src
            if d < p - 1:
                assert f"# SEND_ACT(s{d},mb{mb}->d{d + 1})" in src
                assert f"# RECV_GRAD(s{d},mb{mb}<-d{d + 1})" in src
        # every call line carries the instruction it came from
        calls = [ln for ln in src.splitlines() if ln.strip().startswith("rt.")]
        assert calls and all(re.search(r"\)  # [A-Z_]+\(s\d+,mb\d+", ln) for ln in calls)
        infer = cm.code(d, train=False)
        assert f"def device_{d}(rt):" in infer and "# F(" in infer and "# B(" not in infer
    with pytest.raises(PlanError):
        cm.code(p)
