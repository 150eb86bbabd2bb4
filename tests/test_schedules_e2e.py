"""Interleaved 1F1B and ZB-H1 run by the runtime: outputs, loss and every gradient equal eager."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxpipe
from fxpipe.cli import main as cli_main


def _mlp(n=6, d=16):
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(n)])


def _check(model, x, t, loss_fn, **kw):
    ref = copy.deepcopy(model)
    cm = fxpipe.compile(model, example_inputs=(x,), **kw)
    torch.testing.assert_close(cm(x), ref(x), rtol=1e-4, atol=1e-5)
    loss = cm.step(x, target=t, loss_fn=loss_fn)
    want = loss_fn(ref(x), t)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    return cm


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (2, 5, 2), (3, 6, 2), (2, 4, 3), (4, 8, 2)])
def test_interleaved_equals_eager(p, m, v):
    x, t = torch.randn(10, 16), torch.randn(10, 16)
    cm = _check(_mlp(8), x, t, nn.functional.mse_loss, devices=["cpu"] * p, microbatches=m,
                schedule="interleaved", virtual_stages=v)
    assert cm.plan.num_stages == p * v
    assert [s.device for s in cm.plan.stages] == [s % p for s in range(p * v)]
    assert cm.plan.schedule.kind == "interleaved"


@pytest.mark.parametrize("p,m", [(1, 3), (2, 4), (3, 5), (4, 8)])
def test_zb_h1_equals_eager(p, m):
    x, t = torch.randn(9, 16), torch.randn(9, 16)
    cm = _check(_mlp(6), x, t, nn.functional.mse_loss, devices=["cpu"] * p, microbatches=m, schedule="zb-h1")
    code = cm.code(0)
    assert "rt.backward_input(0, 0)" in code and "rt.backward_weight(0, 0)" in code


def test_zb_h1_with_weight_reused_inside_a_stage():
    """A weight used twice in one stage takes the exact fallback path of the split backward."""

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    x, t = torch.randn(6, 8), torch.randn(6, 8)
    _check(Reuse(), x, t, nn.functional.mse_loss, devices=["cpu", "cpu"], microbatches=3, schedule="zb-h1")


def test_gpt2_tied_embedding_zb_h1_and_interleaved():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out.logits.flatten(0, 1), t.flatten())

    x = torch.randint(0, 64, (6, 8))
    for kw in ({"schedule": "zb-h1", "microbatches": 3}, {"schedule": "interleaved", "microbatches": 2}):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        ref = copy.deepcopy(model)
        cm = fxpipe.compile(model, ["cpu", "cpu"], (x,), **kw)
        loss = cm.step(x, target=x, loss_fn=loss_fn)
        want = loss_fn(ref(x), x)
        want.backward()
        assert abs(loss.item() - want.item()) < 1e-5
        assert model.lm_head.weight is model.transformer.wte.weight
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_virtual_stages_needs_interleaved():
    with pytest.raises(fxpipe.PlanError, match="interleaved"):
        fxpipe.plan(_mlp(), ["cpu", "cpu"], (torch.randn(4, 16),), schedule="1f1b", virtual_stages=2)


def test_simulate_and_measured_trace(tmp_path):
    model, x = _mlp(4, 32), torch.randn(16, 32)
    cm = fxpipe.compile(model, ["cpu", "cpu"], (x,), microbatches=4)
    tl = fxpipe.simulate(cm.plan)
    assert tl.step_time > 0 and len(tl.bubble_fraction) == 2
    assert tl.peak_memory is not None and all(m > 0 for m in tl.peak_memory)
    path = tmp_path / "run.json"
    cm.step(x, target=x, loss_fn=nn.functional.mse_loss, trace=str(path))
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["name"] for e in events if e.get("ph") == "X"}
    predicted = {e["name"] for e in tl.to_chrome_trace()["traceEvents"] if e.get("ph") == "X" and e.get("cat") != "wait"}
    # every predicted compute event has a measured twin with the same name
    assert {n for n in predicted if n.startswith(("F ", "B "))} <= names
    assert cm.last_timeline.step_time > 0


def test_cli_plan_interleaved_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    factory = tmp_path / "m.py"
    factory.write_text("import torch\n"
                       "def make():\n"
                       "    m = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(8)])\n"
                       "    return m, torch.randn(8, 16)\n")
    plan_path = tmp_path / "plan.json"
    assert cli_main(["plan", f"{factory}:make", "--devices", "cpu*2", "--schedule", "interleaved",
                     "--microbatches", "4", "-o", str(plan_path)]) == 0
    plan = fxpipe.Plan.load(plan_path)
    assert plan.num_stages == 4 and plan.schedule.kind == "interleaved"
    png = tmp_path / "plan.png"
    assert cli_main(["inspect", str(plan_path), "--format", "png", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fuse_option_rewrites_and_stays_equal(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ref = copy.deepcopy(model)
    x = torch.randint(0, 64, (4, 8))

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out.logits.flatten(0, 1), t.flatten())

    cm = fxpipe.compile(model, ["cpu", "cpu"], (x,), microbatches=2, fuse=True)
    assert cm.plan.predicted["fuse"] is True
    assert "fused_" in "".join(sg.code() for sg in cm.stage_graphs)
    torch.testing.assert_close(cm(x).logits, ref(x).logits, rtol=1e-4, atol=1e-5)
    loss = cm.step(x, target=x, loss_fn=loss_fn)
    want = loss_fn(ref(x), x)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the plan remembers the rewrite: compiling from it again fuses the same way
    cm.plan.save(tmp_path / "plan.json")
    again = fxpipe.compile(copy.deepcopy(ref), plan=str(tmp_path / "plan.json"), example_inputs=(x,))
    assert "fused_" in "".join(sg.code() for sg in again.stage_graphs)
