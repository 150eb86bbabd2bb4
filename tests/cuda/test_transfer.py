"""Copy-stream channels (runtime/transfer.py): values arrive intact on every route, and a
pipeline with FXPIPE_COPY_STREAMS=1 equals eager. The CUDA cases skip without a GPU; the CPU
case checks that the switch leaves CPU-only pipelines as they were."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpipe
from fxpipe.runtime.transfer import Channel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model():
    return nn.Sequential(*[nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(4)])


def _assert_equal_to_eager(devices, monkeypatch):
    monkeypatch.setenv("FXPIPE_COPY_STREAMS", "1")
    model = _model()
    ref = copy.deepcopy(model)
    x, t = torch.randn(16, 32), torch.randn(16, 32)
    cm = fxpipe.compile(model, devices, (x,), microbatches=4)
    assert cm._rt.copy_streams
    for _ in range(2):  # the second step reuses the channels and the host allocator's buffers
        loss = cm.step(x, target=t, loss_fn=F.mse_loss)
    for _ in range(2):  # no optimizer step: both sides accumulate the same gradients twice
        ref_loss = F.mse_loss(ref(x), t)
        ref_loss.backward()
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-6)


def test_cpu_pipeline_with_copy_streams_switched_on_is_unchanged(monkeypatch):
    _assert_equal_to_eager(["cpu", "cpu"], monkeypatch)


@cuda
@pytest.mark.parametrize("route", ["cuda->cpu", "cpu->cuda", "cuda->cuda via host"])
def test_channel_routes_deliver_the_values(route):
    dev = torch.device("cuda", 0)
    src, dst, via = {"cuda->cpu": (dev, torch.device("cpu"), False), "cpu->cuda": (torch.device("cpu"), dev, False),
                     "cuda->cuda via host": (dev, dev, True)}[route]
    ch = Channel(src, dst, via_host=via)
    xs = [torch.randn(256, 512, device=src) for _ in range(4)]
    expected = [x.cpu().clone() for x in xs]
    got = []
    for x in xs:
        y = x * 2  # queued on the sender's stream just before the send: the copy must wait for it
        moved, ready = ch.send([y, 3])
        got.append(ch.receive(moved, ready))
    for (t, k), e in zip(got, expected):
        assert k == 3 and t.device.type == dst.type
        torch.testing.assert_close(t.cpu(), e * 2)


@cuda
def test_gpu_and_cpu_workers_with_copy_streams_equal_eager(monkeypatch):
    _assert_equal_to_eager(["cuda:0", "cpu"], monkeypatch)
