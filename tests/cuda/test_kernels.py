"""Fused CuPy kernels vs eager PyTorch on a CUDA device, forward and backward, fp32/fp16/bf16.

Skipped without CUDA or CuPy (the CPU suite covers the rewrite and the eager fallback in
tests/passes/test_fuse_elementwise.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxpipe.cuda import fused_ops, kernels

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not kernels.available(), reason="needs a CUDA device and CuPy")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}
# row lengths: vectorised (1024, 768), scalar fallback (100: not a multiple of the vector width)
SHAPES = [(64, 1024), (3, 7, 768), (9, 100)]


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None and t.is_floating_point() else t for t in ts]


def _assert_matches_eager(fused_fn, eager_fn, inputs, dtype, grad_idx):
    """fused(inputs) vs eager(inputs upcast to fp32): outputs and gradients of `grad_idx`."""
    a = _leaves(*inputs)
    ref = _leaves(*[t.float() if t is not None and t.is_floating_point() else t for t in inputs])
    out, exp = fused_fn(*a), eager_fn(*ref)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), exp, **TOL[dtype])
    g = torch.randn_like(exp)
    out.backward(g.to(dtype))
    exp.backward(g)
    for i in grad_idx:
        scale = max(1.0, ref[i].grad.abs().max().item())  # parameter grads sum over rows
        torch.testing.assert_close(a[i].grad.float() / scale, ref[i].grad / scale, **TOL[dtype])


def _kernels_ran():
    return kernels._module.cache_info().currsize > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approx", ["none", "tanh"])
def test_bias_gelu(dtype, shape, approx):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    b = torch.randn(shape[-1], device="cuda", dtype=dtype)
    _assert_matches_eager(lambda x, b: fused_ops.bias_gelu(x, b, approx), lambda x, b: F.gelu(x + b, approximate=approx),
             (x, b), dtype, (0, 1))
    _assert_matches_eager(lambda x: fused_ops.bias_gelu(x, None), lambda x: F.gelu(x), (x,), dtype, (0,))
    assert _kernels_ran()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep_sum", [False, True])
def test_add_layer_norm(dtype, shape, keep_sum):
    a, b = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.randn(shape[-1], device="cuda", dtype=dtype)
    beta = torch.randn(shape[-1], device="cuda", dtype=dtype)
    n = (shape[-1],)

    def fused(a, b, w, beta):
        y, s = fused_ops.add_layer_norm(a, b, n, w, beta, 1e-5, keep_sum)
        return y + 0.5 * s if keep_sum else y  # a use of the sum sends a gradient through it

    def eager(a, b, w, beta):
        s = a + b
        y = F.layer_norm(s, n, w, beta, 1e-5)
        return y + 0.5 * s if keep_sum else y

    _assert_matches_eager(fused, eager, (a, b, w, beta), dtype, (0, 1, 2, 3))
    _assert_matches_eager(lambda a, b: fused_ops.add_layer_norm(a, b, n, None, None, 1e-5)[0],
             lambda a, b: F.layer_norm(a + b, n, None, None, 1e-5), (a, b), dtype, (0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "add", "add_broadcast", "fill"])
@pytest.mark.parametrize("divide", [False, True])
def test_scale_mask_softmax(dtype, mask_kind, divide):
    x = torch.randn(2, 4, 64, 256, device="cuda", dtype=dtype)
    mask, kind, fill = None, mask_kind, 0.0
    if mask_kind == "add":
        mask = torch.randn_like(x)
    elif mask_kind == "add_broadcast":
        mask, kind = torch.randn(2, 1, 64, 256, device="cuda", dtype=dtype), "add"
    elif mask_kind == "fill":
        mask = torch.rand(2, 1, 64, 256, device="cuda") < 0.3
        mask[..., 0] = False  # no row fully masked (softmax of all -inf is NaN in both)
        fill = float("-inf")
    s = 8.0 if divide else 0.125

    def eager(x):
        v = x / s if divide else x * s
        if kind == "add":
            v = v + mask.float()
        elif kind == "fill":
            v = v.masked_fill(mask, fill)
        return torch.softmax(v, -1)

    _assert_matches_eager(lambda x: fused_ops.scale_mask_softmax(x, s, divide, mask, kind, fill, -1), eager, (x,), dtype, (0,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_add(dtype, shape):
    x, r = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(2))
    # p = 0 and eval mode are exact
    _assert_matches_eager(lambda x, r: fused_ops.dropout_add(x, r, 0.0, True), lambda x, r: x + r, (x, r), dtype, (0, 1))
    _assert_matches_eager(lambda x, r: fused_ops.dropout_add(x, r, 0.3, False), lambda x, r: x + r, (x, r), dtype, (0, 1))
    # training: kept values are x / (1 - p), the keep rate is 1 - p, backward uses the same mask
    # (a zero residual keeps x's rounding out of the check)
    p = 0.3
    r = torch.zeros_like(x)
    xl, rl = _leaves(x, r)
    y = fused_ops.dropout_add(xl, rl, p, True)
    d = (y.float() - r.float())
    kept = d != 0
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 0.05 + 3 / x.numel() ** 0.5
    torch.testing.assert_close(d[kept], (x.float() / (1 - p))[kept], **TOL[dtype])
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(xl.grad.float(), (g.float() / (1 - p)) * kept, **TOL[dtype])
    torch.testing.assert_close(rl.grad, g)
    # the same seed gives the same mask
    torch.manual_seed(3)
    y1 = fused_ops.dropout_add(x, r, p, True)
    torch.manual_seed(3)
    assert torch.equal(y1, fused_ops.dropout_add(x, r, p, True))


def test_fused_graph_on_cuda_matches_eager():
    from torch import nn

    from fxpipe.passes.fuse_elementwise import fuse_elementwise

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(256)
            self.b = nn.Parameter(torch.randn(256))

        def forward(self, x, m):
            h = F.gelu(x + self.b)
            y = self.ln(h + x)
            a = torch.softmax(y * 0.5 + m, dim=-1)
            return F.dropout(a, 0.0, True) + y

    model = Block().cuda()
    x = torch.randn(8, 16, 256, device="cuda", requires_grad=True)
    m = torch.randn(8, 16, 256, device="cuda")
    gm = torch.fx.symbolic_trace(model)
    ref = model(x, m)
    (gx,) = torch.autograd.grad(ref.sum(), x)
    res = fuse_elementwise(gm)
    assert sorted(res.fused) == ["add_layer_norm", "bias_gelu", "dropout_add", "scale_mask_softmax"]
    out = gm(x, m)
    (fx_,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fx_, gx, atol=1e-4, rtol=1e-4)


def test_dlpack_sharing_gives_the_same_results(monkeypatch):
    x = torch.randn(32, 512, device="cuda", requires_grad=True)
    b = torch.randn(512, device="cuda", requires_grad=True)
    ref = fused_ops.bias_gelu(x, b)
    ref.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    monkeypatch.setattr(kernels, "SHARE", "dlpack")
    out = fused_ops.bias_gelu(x, b)
    out.sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, gx)


# ---- general elementwise chains --------------------------------------------------------------

NEW_GELU = ("mul(i0,0.5);pow(i0,3.0);mul(v1,0.044715);add(i0,v2);mul(v3,0.7978845608028654);tanh(v4);"
            "add(v5,1.0);mul(v0,v6)")
CHAINS = [
    # (program, input shapes (output shape first), positive-only inputs)
    (NEW_GELU, [(64, 1024)], False),
    ("silu(i0);mul(v0,i1)", [(3, 7, 768), (3, 7, 768)], False),                     # SwiGLU
    ("add(i0,i1);gelu(v0);mul(v1,i2)", [(9, 100), (100,), ()], False),              # row + scalar inputs
    ("sub(1.0,i0);div(v0,i1);rsqrt(i1);mul(v1,v2);sigmoid(v3);relu(i0);add(v4,v5)",
     [(4, 33, 16), (4, 1, 16)], True),                                                # expanded broadcast
    ("neg(i0);exp(v0);log(i1);sqrt(i1);add(v1,v2);mul(v4,v3);tanh(i0);gelu_tanh(v6);sub(v5,v7)",
     [(256, 257), (256, 257)], True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("program,shapes,positive", CHAINS, ids=[str(i) for i in range(len(CHAINS))])
def test_elementwise_chain(dtype, program, shapes, positive):
    from fxpipe.cuda.chain import run_eager

    ts = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
    if positive:
        ts = [t.abs() + 0.5 for t in ts]
    _assert_matches_eager(lambda *a: fused_ops.elementwise_chain(program, *a), lambda *a: run_eager(program, a),
                          ts, dtype, tuple(range(len(ts))))
    assert kernels._chain_functions.cache_info().currsize > 0
