"""Fused ops that `passes/fuse_elementwise.py` puts into graphs.

Each op is a plain function (so fx code generation can name it) that runs a CuPy kernel pair
inside a `torch.autograd.Function` when its tensors are on a CUDA device in fp32/fp16/bf16
and CuPy is installed, and otherwise the eager composition of the ops it replaced, in the
same order and with the same RNG use: a rewritten graph runs, and gives the same numbers,
on CPU, on the meta device during shape propagation, and under fake tensors.

Ops:
    bias_gelu(x, bias, approximate)          gelu(x + bias)
    add_layer_norm(a, b, shape, w, beta, eps, keep_sum) -> (layer_norm(a + b), a + b or None)
    scale_mask_softmax(x, scale, divide, mask, mask_kind, fill_value, dim)
                                             softmax((x * scale | x / scale) (+ mask | masked_fill), dim)
    dropout_add(x, residual, p, training)    dropout(x, p, training) + residual
    elementwise_chain(program, *inputs)      the ops of `program` (see `cuda/chain.py`)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fxpipe.cuda import chain as C
from fxpipe.cuda import kernels as K

__all__ = ["bias_gelu", "add_layer_norm", "scale_mask_softmax", "dropout_add", "elementwise_chain", "FUSED_OPS"]


def _cuda_ok(*ts: Any) -> bool:
    tensors = [t for t in ts if t is not None]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    first = tensors[0]
    if first.dtype not in K.DTYPES or first.numel() == 0:
        return False
    for t in tensors:
        if not t.is_cuda or t.dtype != first.dtype or t.device != first.device:
            return False
        if isinstance(t, torch._subclasses.FakeTensor):
            return False
    return K.available()


def _aligned(*ts: torch.Tensor | None) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in ts)


def _vec(dtype: torch.dtype, sizes: Sequence[int], *ts: torch.Tensor | None) -> int:
    v = K.vec_width(dtype, *sizes)
    return v if _aligned(*ts) else 1


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _f32(v: float) -> np.float32:
    return np.float32(v)


# ---- bias + GELU ---------------------------------------------------------------------------

class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        x = x.contiguous()
        h = x.shape[-1]
        vec = _vec(x.dtype, (h, x.numel()), x, bias)
        y = torch.empty_like(x)
        nv = x.numel() // vec
        tanh = int(approximate == "tanh")
        grid, fixed = K.elementwise_grid(nv, x.device, h // vec)
        K.launch("elementwise", "bias_gelu_fwd", x.dtype, vec, grid, 256, 1,
                 [x, bias, y, np.int64(nv), _i32(h), _i32(bias is not None), _i32(tanh), _i32(fixed)])
        ctx.save_for_backward(x, bias)
        ctx.meta = (vec, tanh)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        vec, tanh = ctx.meta
        dy = dy.contiguous()
        if not _aligned(dy):
            vec = 1
        dx = torch.empty_like(x)
        nv = x.numel() // vec
        grid, fixed = K.elementwise_grid(nv, x.device, x.shape[-1] // vec)
        K.launch("elementwise", "bias_gelu_bwd", x.dtype, vec, grid, 256, 1,
                 [dy, x, bias, dx, np.int64(nv), _i32(x.shape[-1]), _i32(bias is not None), _i32(tanh), _i32(fixed)])
        db = None
        if bias is not None and ctx.needs_input_grad[1]:
            db = dx.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
        return dx, db, None


def bias_gelu(x: Any, bias: Any = None, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias); bias may be None (GELU alone)."""
    if isinstance(x, torch.Tensor) and isinstance(bias, torch.Tensor) and x.dim() == 1 and bias.dim() > 1:
        x, bias = bias, x  # the 1-D operand is the bias (addition commutes exactly)
    ok = _cuda_ok(x, bias) and (bias is None or (bias.dim() == 1 and bias.numel() == x.shape[-1]))
    if not ok:
        return F.gelu(x if bias is None else x + bias, approximate=approximate)
    return _BiasGelu.apply(x, bias, approximate)


# ---- residual add + LayerNorm --------------------------------------------------------------

class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weight, beta, eps, keep_sum, cfg):
        vec, threads, nv = cfg
        a, b = a.contiguous(), b.contiguous()
        cols = a.shape[-1]
        rows = a.numel() // cols
        y = torch.empty_like(a)
        s = torch.empty_like(a) if keep_sum else None
        mean = torch.empty(rows, device=a.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        K.launch("rows", "add_ln_fwd", a.dtype, vec, rows, threads, nv,
                 [a, b, weight, beta, y, s, mean, rstd, _i32(rows), _i32(cols), _f32(eps),
                  _i32(1), _i32(weight is not None), _i32(beta is not None), _i32(keep_sum)])
        ctx.save_for_backward(a, b, weight, beta, mean, rstd)
        ctx.cfg = cfg
        return (y, s) if keep_sum else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        a, b, weight, beta, mean, rstd = ctx.saved_tensors
        vec, threads, nv = ctx.cfg
        cols = a.shape[-1]
        rows = a.numel() // cols
        dy = dy.contiguous()
        ds = ds.contiguous() if ds is not None else None
        if not _aligned(dy, ds):
            vec, threads, nv = _row_cfg(1, cols)
        grid = max(1, min(rows, K._sm_count(a.device.index or 0) * 8))
        dx = torch.empty_like(a)
        dw_part = torch.empty(grid, cols, device=a.device, dtype=torch.float32)
        db_part = torch.empty_like(dw_part)
        K.launch("rows", "add_ln_bwd", a.dtype, vec, grid, threads, nv,
                 [dy, ds, a, b, weight, mean, rstd, dx, dw_part, db_part, _i32(rows), _i32(cols),
                  _i32(1), _i32(weight is not None), _i32(ds is not None)])
        dw = dw_part.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        dbeta = db_part.sum(0).to(beta.dtype) if beta is not None and ctx.needs_input_grad[3] else None
        return dx, dx, dw, dbeta, None, None, None


def _row_cfg(vec: int, cols: int, per_thread: int = 16) -> tuple[int, int, int] | None:
    rc = K.row_config(cols, vec, per_thread)
    return None if rc is None else (vec, rc[0], rc[1])


def add_layer_norm(a: Any, b: Any, normalized_shape: Sequence[int], weight: Any = None, bias: Any = None,
                   eps: float = 1e-5, keep_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(layer_norm(a + b), a + b if keep_sum else None), normalising over the last dim."""
    ok = (_cuda_ok(a, b, weight, bias) and a.shape == b.shape and tuple(normalized_shape) == (a.shape[-1],)
          and all(t is None or tuple(t.shape) == (a.shape[-1],) for t in (weight, bias)))
    cfg = None
    if ok:
        cols = a.shape[-1]
        cfg = _row_cfg(_vec(a.dtype, (cols,), a, b, weight, bias), cols, K.TUNING.ln_values)
    if cfg is None:
        s = a + b
        return F.layer_norm(s, normalized_shape, weight, bias, eps), (s if keep_sum else None)
    out = _AddLayerNorm.apply(a, b, weight, bias, float(eps), bool(keep_sum), cfg)
    return out if keep_sum else (out, None)


# ---- scale + mask + softmax ---------------------------------------------------------------

class _ScaleMaskSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale, divide, kind, fill_value, cfg, mask_geo):
        vec, threads, nv = cfg
        x = x.contiguous()
        cols = x.shape[-1]
        rows = x.numel() // cols
        y = torch.empty_like(x)
        (l1, l2, l3), (m0, m1, m2, m3) = mask_geo
        K.launch("rows", "softmax_fwd", x.dtype, vec, rows, threads, nv,
                 [x, mask, y, _i32(rows), _i32(cols), _f32(scale), _i32(divide), _i32(kind), _f32(fill_value),
                  _i32(l1), _i32(l2), _i32(l3), np.int64(m0), np.int64(m1), np.int64(m2), np.int64(m3)])
        ctx.save_for_backward(y)
        ctx.meta = (cfg, scale, divide)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        (vec, threads, nv), scale, divide = ctx.meta
        dy = dy.contiguous()
        cols = y.shape[-1]
        rows = y.numel() // cols
        if not _aligned(dy):
            vec, threads, nv = _row_cfg(1, cols, 4)
        dx = torch.empty_like(y)
        K.launch("rows", "softmax_bwd", y.dtype, vec, rows, threads, nv,
                 [dy, y, dx, _i32(rows), _i32(cols), _f32(scale), _i32(divide)])
        return dx, None, None, None, None, None, None, None


def _mask_geometry(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple] | None:
    try:
        if torch.broadcast_shapes(x.shape, mask.shape) != x.shape:
            return None
    except RuntimeError:
        return None
    me = mask.expand(x.shape)
    lead = list(x.shape[:-1])
    strides = list(me.stride()[:-1])
    if me.stride(-1) != 1 or len(lead) > 4:
        me = me.contiguous()
        lead, strides = [x.numel() // x.shape[-1]], [x.shape[-1]]
    while len(lead) < 4:
        lead.insert(0, 1)
        strides.insert(0, 0)
    return me, (lead[1], lead[2], lead[3]), tuple(strides)


def scale_mask_softmax(x: Any, scale: float | None = None, divide: bool = False, mask: Any = None,
                       mask_kind: str = "none", fill_value: float = 0.0, dim: int = -1) -> torch.Tensor:
    """softmax over `dim` of x scaled (x * scale, or x / scale if divide) then masked.

    mask_kind "add": + mask; "fill": masked_fill(mask, fill_value); "none": no mask.
    """
    if not _cuda_ok(x) or not isinstance(x, torch.Tensor) or dim not in (-1, x.dim() - 1):
        return _smsoftmax_eager(x, scale, divide, mask, mask_kind, fill_value, dim)
    kind = {"none": 0, "add": 1, "fill": 2}[mask_kind]
    geo = None
    if kind:
        bad = (not isinstance(mask, torch.Tensor) or not mask.is_cuda or mask.device != x.device
               or (kind == 1 and (mask.dtype != x.dtype or (mask.requires_grad and torch.is_grad_enabled())))
               or (kind == 2 and mask.dtype != torch.bool) or not isinstance(fill_value, (int, float)))
        geo = None if bad else _mask_geometry(x, mask)
        if geo is None:
            return _smsoftmax_eager(x, scale, divide, mask, mask_kind, fill_value, dim)
    cols = x.shape[-1]
    me = geo[0] if geo else None
    sizes = (cols,) + (tuple(geo[2]) if geo else ())
    vec = _vec(x.dtype, sizes, x, me)
    # a few vectors per thread: smaller blocks, more rows in flight per SM (bf16 0.150 vs
    # 0.193 ms at 16384x4096 on an H100 with 4 vectors against 16 values per thread)
    cfg = _row_cfg(vec, cols, K.TUNING.softmax_vectors * vec)
    if cfg is None:
        return _smsoftmax_eager(x, scale, divide, mask, mask_kind, fill_value, dim)
    s = 1.0 if scale is None else float(scale)
    mgeo = (geo[1], geo[2]) if geo else ((1, 1, 1), (0, 0, 0, 0))
    return _ScaleMaskSoftmax.apply(x, me, s, int(divide and scale is not None), kind, float(fill_value), cfg, mgeo)


def _smsoftmax_eager(x, scale, divide, mask, mask_kind, fill_value, dim):
    v = x
    if scale is not None:
        v = v / scale if divide else v * scale
    if mask_kind == "add":
        v = v + mask
    elif mask_kind == "fill":
        v = v.masked_fill(mask, fill_value)
    return torch.softmax(v, dim)


# ---- dropout + residual add ---------------------------------------------------------------

class _DropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, p, train, vec):
        x, residual = x.contiguous(), residual.contiguous()
        y = torch.empty_like(x)
        nv = x.numel() // vec
        # the seed comes from torch's default generator, so torch.manual_seed makes runs repeat
        s0, s1 = (int(v) for v in torch.randint(0, 2**31 - 1, (2,)))
        scale = 1.0 / (1.0 - p) if train else 1.0
        K.launch("elementwise", "dropout_add_fwd", x.dtype, vec, K.elementwise_grid(nv, x.device)[0], 256, 1,
                 [x, residual, y, np.int64(nv), _f32(p), _f32(scale), np.uint32(s0), np.uint32(s1), _i32(train)])
        ctx.meta = (p, scale, s0, s1, train, vec)
        return y

    @staticmethod
    def backward(ctx, dy):
        p, scale, s0, s1, train, vec = ctx.meta
        dy = dy.contiguous()
        if not train:
            return dy, dy, None, None, None
        vec = _vec(dy.dtype, (dy.numel(),), dy)  # the mask is indexed by element, not by vector
        dx = torch.empty_like(dy)
        nv = dy.numel() // vec
        K.launch("elementwise", "dropout_add_bwd", dy.dtype, vec, K.elementwise_grid(nv, dy.device)[0], 256, 1,
                 [dy, dx, np.int64(nv), _f32(p), _f32(scale), np.uint32(s0), np.uint32(s1)])
        return dx, dy, None, None, None


def dropout_add(x: Any, residual: Any, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """dropout(x, p, training) + residual. On CUDA the mask comes from a counter-based hash
    (regenerated in backward, never stored), so it differs from torch's own dropout stream."""
    train = bool(training) and p > 0
    ok = (_cuda_ok(x, residual) and x.shape == residual.shape and 0 <= p < 1)
    if not ok:
        return F.dropout(x, p, training) + residual
    vec = _vec(x.dtype, (x.numel(),), x, residual)
    return _DropoutAdd.apply(x, residual, float(p), train, vec)


# ---- general elementwise chains --------------------------------------------------------------

def _chain_operands(inputs: Sequence[torch.Tensor], shape: torch.Size) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    """Inputs as the kernels index them (see `chain.BROADCAST_MODES`), other broadcasts expanded."""
    ready, modes = [], []
    cols = shape[-1] if len(shape) else 1
    for t in inputs:
        if t.shape == shape:
            ready.append(t.contiguous())
            modes.append("full")
        elif t.numel() == 1:
            ready.append(t.reshape(()).contiguous())
            modes.append("scalar")
        elif t.dim() >= 1 and t.numel() == cols and t.shape[-1] == cols:
            ready.append(t.contiguous())
            modes.append("row")
        else:
            ready.append(t.expand(shape).contiguous())
            modes.append("full")
    return ready, tuple(modes)


class _Chain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, program, *inputs):
        shape = torch.broadcast_shapes(*(t.shape for t in inputs))
        ready, modes = _chain_operands(inputs, shape)
        out = torch.empty(shape, dtype=inputs[0].dtype, device=inputs[0].device)
        K.launch_chain(program, modes, None, [*ready, out], out.numel(), shape[-1] if len(shape) else 1)
        ctx.save_for_backward(*inputs)
        ctx.program = program
        return out

    @staticmethod
    def backward(ctx, dy):
        inputs = ctx.saved_tensors
        need = tuple(bool(x) for x in ctx.needs_input_grad[1:])
        if not any(need):
            return (None,) * (1 + len(inputs))
        dy = dy.contiguous()
        ready, modes = _chain_operands(inputs, dy.shape)
        grads = [torch.empty_like(dy) if k else None for k in need]
        K.launch_chain(ctx.program, modes, need, [*ready, dy, *(g for g in grads if g is not None)], dy.numel(),
                       dy.shape[-1] if dy.dim() else 1)
        out = [None if g is None else (g if g.shape == t.shape else g.sum_to_size(t.shape)) for g, t in zip(grads, inputs)]
        return (None, *out)


def elementwise_chain(program: str, *inputs: Any) -> Any:
    """The elementwise ops of `program` applied to `inputs` (see `fxpipe.cuda.chain`).

    On CUDA (fp32/fp16/bf16, all inputs one dtype) one kernel computes the whole chain in fp32
    registers and one kernel its backward; elsewhere the ops run one by one as in the graph.

    Example:
        >>> x, u = torch.randn(4, 8), torch.randn(4, 8)
        >>> torch.equal(elementwise_chain("silu(i0);mul(v0,i1)", x, u), F.silu(x) * u)
        True
    """
    if inputs and _cuda_ok(*inputs):
        C.parse_program(program)  # a malformed program fails here, not inside NVRTC
        return _Chain.apply(program, *inputs)
    return C.run_eager(program, tuple(inputs))


FUSED_OPS = {
    "bias_gelu": bias_gelu,
    "add_layer_norm": add_layer_norm,
    "scale_mask_softmax": scale_mask_softmax,
    "dropout_add": dropout_add,
    "elementwise_chain": elementwise_chain,
}
