"""Model zoo, round 2: families and patterns test_model_zoo.py did not try.

Same contract: a `copy.deepcopy` taken before compiling is the eager reference; `cm(...)`,
the step's loss and EVERY parameter's `.grad` (by name) equal it in fp32, or the model is
refused with a typed fxpipe error that names the reason and the fix. Each case pins a bug
found by trying it:

* an output that relates samples to each other (a two-tower model's (batch, batch) image x
  text logits, CLIP) or has its batch elsewhere than dim 0 (XLNet's (seq, batch, d) mems) was
  refused at capture even with microbatches=1, where nothing is concatenated and the pipeline
  is exact: a contrastive loss over the whole batch could not be pipelined at all. Now only
  m > 1 is refused (PlanError naming the output), and "auto" keeps m = 1;
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpipe
from fxpipe import PlanError
from test_model_zoo import run  # compile, then inference, loss and every gradient against eager

B = 6


# ---- outputs relating the samples of a batch: exact with one microbatch ----------------------------


class TwoTower(nn.Module):
    """CLIP's shape: an image tower and a text tower, and every image against every text."""

    def __init__(self):
        super().__init__()
        self.img = nn.ModuleList([nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 8)])
        self.emb = nn.Embedding(30, 16)
        self.txt = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 8)])
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, pixels, ids):
        x = pixels
        for lin in self.img:
            x = torch.tanh(lin(x))
        t = self.emb(ids).mean(1)
        for lin in self.txt:
            t = torch.tanh(lin(t))
        x, t = F.normalize(x, dim=-1), F.normalize(t, dim=-1)
        return {"logits_per_image": self.scale * x @ t.T, "image_embeds": x, "text_embeds": t}


def contrastive(out, labels):  # labels: arange(batch), image i belongs to text i
    logits = out["logits_per_image"]
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _two_tower():
    torch.manual_seed(0)
    return TwoTower(), (torch.randn(B, 12), torch.randint(0, 30, (B, 5)))


@pytest.mark.parametrize("p", [2, 3])
def test_batch_relating_output_is_exact_with_one_microbatch(p):
    model, inputs = _two_tower()
    cm = run(model, inputs, torch.arange(B), contrastive, p=p, m=1)
    assert cm.plan.num_stages == p


def test_batch_relating_output_refuses_microbatches_and_auto_keeps_one():
    model, inputs = _two_tower()
    with pytest.raises(PlanError, match=r"output \['logits_per_image'\] has shape \(2, 2\) .* \(1, 1\).*"
                                        r"grows with the batch.*microbatches=1"):
        fxpipe.compile(model, ["cpu"] * 2, example_inputs=inputs, microbatches=2)
    plan = fxpipe.plan(model, ["cpu"] * 2, example_inputs=inputs, microbatches="auto", schedule="1f1b")
    assert plan.microbatches == 1


# ---- outputs that do not depend on the batch -------------------------------------------------------


class ReturnsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for lin in self.ls:
            x = torch.tanh(lin(x))
        # the bias as is (a get_attr output); a table of weights only, with dim 0 = 4 = the
        # microbatch size below, which a shape test would take for a batch
        return self.head(x), self.head.bias, self.ls[0].weight[:4] * 2


def out_and_decay(out, t):
    return F.mse_loss(out[0], t) + 0.1 * out[1].pow(2).sum() + 0.01 * out[2].pow(2).sum()


@pytest.mark.parametrize("p, m, schedule, method", [(2, 1, "1f1b", "fx"), (2, 2, "1f1b", "fx"),
                                                     (3, 3, "zb-h1", "fx"), (2, 2, "gpipe", "export"), (3, 3, "1f1b", "fx"), (2, 2, "zb-h1", "fx"), (2, 2, "zb-h1", "export")])
def test_parameter_and_weight_only_outputs(p, m, schedule, method):
    torch.manual_seed(0)
    cm = run(ReturnsWeights(), (torch.randn(8, 8),), torch.randn(8, 4), out_and_decay, p=p, m=m, schedule=schedule,
             capture_method=method)
    assert cm(torch.randn(8, 8))[2].shape == (4, 8)


class WeightSentOn(nn.Module):
    """A weight-only value made in the first stage and read in the last (zb-h1's BW must still
    give the weight that path's gradient)."""

    def __init__(self):
        super().__init__()
        self.tab = nn.Parameter(torch.randn(8, 8) / 3)
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        w = torch.tanh(self.tab) * 2
        for lin in self.ls:
            x = torch.tanh(lin(x))
        return x @ w


@pytest.mark.parametrize("p", [2, 3])
def test_weight_only_value_crossing_stages_under_zero_bubble(p):
    torch.manual_seed(0)
    cm = run(WeightSentOn(), (torch.randn(8, 8),), torch.randn(8, 8), F.mse_loss, p=p, m=3, schedule="zb-h1")
    assert cm.plan.num_stages == p


def test_cache_switched_off_in_composite_configs_during_capture():
    """LLaVA keeps use_cache in config.text_config: left on, export met a DynamicCache output
    ("not a known type") instead of the model's real limits."""
    T = pytest.importorskip("transformers")
    from fxpipe.compiler.capture import _disable_hf_cache

    cfg = T.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1),
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4), image_token_index=63)
    model = T.LlavaForConditionalGeneration(cfg)
    configs = [model.config.text_config] + [m.config for m in model.modules() if hasattr(m, "config")]
    assert model.config.text_config.use_cache
    restore = _disable_hf_cache(model)
    assert not any(getattr(c, "use_cache", False) for c in configs)
    restore()
    assert model.config.text_config.use_cache
