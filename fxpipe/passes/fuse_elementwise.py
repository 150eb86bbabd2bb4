"""Fuse memory-bound chains into single ops (CuPy kernels on CUDA, eager elsewhere).

Patterns, each found in graphs from both capture paths (fx: torch functions, `nn.functional`,
`call_module` of `nn.GELU` / `nn.LayerNorm` / `nn.Softmax` / `nn.Dropout`, tensor methods;
torch.export: aten ops such as `aten.add.Tensor`, `aten.gelu.default`,
`aten.layer_norm.default`, `aten.softmax.int`, `aten.dropout.default`):

=====================  ======================================================  ====================
name                   matched chain                                           fused op
=====================  ======================================================  ====================
bias_gelu              gelu(add(x, b))                                         fused_ops.bias_gelu
add_layer_norm         layer_norm(add(a, b)) over the last dim; the sum may    fused_ops.add_layer_norm
                       have other users (then the fused op returns it too)
scale_mask_softmax     softmax(add(x * s | x / s, mask) | masked_fill(...),    fused_ops.scale_mask_softmax
                       dim=-1); the scale or the mask may be absent
dropout_add            add(dropout(x, p, training), residual)                  fused_ops.dropout_add
elementwise_chain      any run of >= 2 elementwise ops (add sub mul div neg    fused_ops.elementwise_chain
                       exp log sqrt rsqrt sigmoid tanh relu gelu silu, x ** c)
                       whose intermediates nobody else reads
=====================  ======================================================  ====================

An intermediate value that another node reads is never swallowed: the chain is left alone
(or, for add+LayerNorm's sum, returned by the fused op as a second output). Where a pair
could join two patterns (a residual add between dropout and LayerNorm), add+LayerNorm wins:
it saves the larger round trip through memory. Chains are matched last, so the named patterns
(whose kernels also fuse a reduction or the RNG) keep their ops; a chain then takes what is
left, e.g. GPT-2's tanh-GELU written out as eight ops, or SwiGLU's ``silu(gate) * up``.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxpipe.cuda import fused_ops
from fxpipe.cuda.chain import ChainStep, format_program
from fxpipe.passes.propagate_shapes import FLOPS, VAL

__all__ = ["fuse_elementwise", "FuseResult", "PATTERNS"]

PATTERNS = ("add_layer_norm", "bias_gelu", "scale_mask_softmax", "dropout_add", "elementwise_chain")

_aten = torch.ops.aten
_ADD = {operator.add, torch.add, _aten.add.Tensor}
_MUL = {operator.mul, torch.mul, _aten.mul.Tensor, _aten.mul.Scalar}
_DIV = {operator.truediv, torch.div, _aten.div.Tensor, _aten.div.Scalar}
_GELU = {F.gelu, torch._C._nn.gelu, _aten.gelu.default}
_LAYER_NORM = {F.layer_norm, torch.layer_norm, _aten.layer_norm.default}
_SOFTMAX = {F.softmax, torch.softmax, _aten.softmax.int, _aten._softmax.default}
_MASKED_FILL = {torch.masked_fill, _aten.masked_fill.Scalar}
_DROPOUT = {F.dropout, torch.dropout, _aten.dropout.default}


class FuseResult(NamedTuple):
    """What `fuse_elementwise` did: the (mutated) module, whether it changed, pattern per fusion."""

    graph_module: fx.GraphModule
    modified: bool
    fused: list[str]


# ---- node classification -----------------------------------------------------------------

def _module(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    if n.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(n.target))
    except AttributeError:
        return None


def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _is_fn(n: Any, fns: set, method: str | None = None) -> bool:
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_function":
        try:
            return n.target in fns
        except TypeError:  # unhashable target
            return False
    return method is not None and n.op == "call_method" and n.target == method


def _tensor_add(n: Any) -> bool:
    """add(x, y) of two graph values, no alpha, not in place."""
    if not _is_fn(n, _ADD, "add") or len(n.args) < 2:
        return False
    if n.kwargs.get("alpha", 1) != 1 or n.kwargs.get("out") is not None or len(n.args) > 2:
        return False
    return isinstance(n.args[0], fx.Node) and isinstance(n.args[1], fx.Node)


def _only_user(n: fx.Node, user: fx.Node) -> bool:
    return len(n.users) == 1 and user in n.users


def _val(n: Any) -> Any:
    return n.meta.get(VAL) if isinstance(n, fx.Node) else None


def _shape(n: Any) -> tuple[int, ...] | None:
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


# ---- rewriting ---------------------------------------------------------------------------

def _fused_node(g: fx.Graph, where: fx.Node, name: str, fn: Callable, args: tuple, kwargs: dict,
                like: fx.Node, replaced: list[fx.Node]) -> fx.Node:
    with g.inserting_before(where):
        node = g.create_node("call_function", fn, args, kwargs, name=f"fused_{name}")
    node.meta.update({k: v for k, v in like.meta.items()})
    node.meta[FLOPS] = sum(r.meta.get(FLOPS, 0) or 0 for r in replaced)
    node.meta["fxpipe.fused"] = name
    return node


def _erase(g: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    for n in nodes:  # consumers first
        g.erase_node(n)


def _fuse_bias_gelu(gm: fx.GraphModule, n: fx.Node) -> bool:
    mod = _module(gm, n)
    if isinstance(mod, nn.GELU):
        approx, inp = mod.approximate, _arg(n, 0, "input")
    elif _is_fn(n, _GELU):
        approx, inp = _arg(n, 1, "approximate", "none"), _arg(n, 0, "input", _arg(n, 0, "self"))
    else:
        return False
    if not _tensor_add(inp) or not _only_user(inp, n) or not isinstance(approx, str):
        return False
    x, b = inp.args[0], inp.args[1]
    sx, sb = _shape(x), _shape(b)
    if sx is not None and sb is not None:  # with shapes known: only a real bias (1-D, last dim)
        if len(sb) != 1 and len(sx) == 1:
            x, b, sx, sb = b, x, sb, sx
        if len(sb) != 1 or not sx or sb[0] != sx[-1]:
            return False
    g = gm.graph
    fused = _fused_node(g, n, "bias_gelu", fused_ops.bias_gelu, (x, b), {"approximate": approx}, n, [inp, n])
    n.replace_all_uses_with(fused)
    _erase(g, [n, inp])
    return True


def _fuse_add_layer_norm(gm: fx.GraphModule, n: fx.Node) -> bool:
    g = gm.graph
    mod = _module(gm, n)
    if isinstance(mod, nn.LayerNorm):
        inp = _arg(n, 0, "input")
        shape, eps = tuple(mod.normalized_shape), mod.eps
        w = b = None
        if not _tensor_add(inp):
            return False
        with g.inserting_before(inp):
            w = g.get_attr(f"{n.target}.weight") if mod.weight is not None else None
            b = g.get_attr(f"{n.target}.bias") if mod.bias is not None else None
        made = [m for m in (w, b) if m is not None]
    elif _is_fn(n, _LAYER_NORM):
        inp, shape = _arg(n, 0, "input"), _arg(n, 1, "normalized_shape")
        w, b, eps = _arg(n, 2, "weight"), _arg(n, 3, "bias"), _arg(n, 4, "eps", 1e-5)
        made = []
        if not _tensor_add(inp) or not isinstance(shape, (list, tuple)) or not isinstance(eps, (int, float)):
            return False
        shape = tuple(shape)
        order = {m: i for i, m in enumerate(g.nodes)}
        for p in (w, b):  # the fused op sits at the add: its parameters must exist there
            if isinstance(p, fx.Node) and order[p] > order[inp]:
                if p.op != "get_attr":
                    return False
                inp.prepend(p)
    else:
        return False
    sa = _shape(inp)
    if len(shape) != 1 or (sa is not None and sa[-1:] != shape) or n not in inp.users:
        for m in made:
            g.erase_node(m)
        return False
    keep = len(inp.users) > 1
    fused = _fused_node(g, inp, "add_layer_norm", fused_ops.add_layer_norm,
                        (inp.args[0], inp.args[1], list(shape), w, b, float(eps)), {"keep_sum": keep}, n, [inp, n])
    fused.meta[VAL] = (_val(n), _val(inp) if keep else None)
    with g.inserting_after(fused):
        out = g.call_function(operator.getitem, (fused, 0))
        out.meta.update(n.meta)
    n.replace_all_uses_with(out)
    g.erase_node(n)
    if keep:
        with g.inserting_after(out):
            s = g.call_function(operator.getitem, (fused, 1))
            s.meta.update(inp.meta)
        inp.replace_all_uses_with(s)
    g.erase_node(inp)
    return True


def _softmax_dim(gm: fx.GraphModule, n: fx.Node) -> tuple[bool, Any, Any]:
    mod = _module(gm, n)
    if isinstance(mod, nn.Softmax):
        return True, _arg(n, 0, "input"), mod.dim
    if _is_fn(n, {_aten._softmax.default}):
        return (not n.args[2]), n.args[0], n.args[1]
    if _is_fn(n, _SOFTMAX, "softmax"):
        if _arg(n, 3 if n.target is F.softmax else 2, "dtype") is not None:
            return False, None, None
        return True, _arg(n, 0, "input", _arg(n, 0, "self")), _arg(n, 1, "dim")
    return False, None, None


def _scalar_scale(n: Any, user: fx.Node) -> tuple[Any, float, bool] | None:
    """(x, s, divide) for x * s, s * x or x / s with a Python number s and one user."""
    if not isinstance(n, fx.Node) or not _only_user(n, user) or n.kwargs or len(n.args) != 2:
        return None
    a, b = n.args
    if _is_fn(n, _MUL, "mul"):
        if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
            return a, float(b), False
        if isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool):
            return b, float(a), False
    if _is_fn(n, _DIV, "div") and isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a, float(b), True
    return None


def _fuse_scale_mask_softmax(gm: fx.GraphModule, n: fx.Node) -> bool:
    ok, inp, dim = _softmax_dim(gm, n)
    if not ok or not isinstance(inp, fx.Node) or not isinstance(dim, int):
        return False
    rank = len(_shape(n) or ()) or None
    if dim != -1 and (rank is None or dim != rank - 1):
        return False
    replaced = [n]
    mask, kind, fill = None, "none", 0.0
    xb = inp
    if _tensor_add(inp) and _only_user(inp, n):
        a, b = inp.args
        if _scalar_scale(b, inp) and not _scalar_scale(a, inp):
            a, b = b, a
        elif not _scalar_scale(a, inp) and _shape(b) is not None and _shape(b) == _shape(inp) != _shape(a):
            a, b = b, a  # the full-size operand is x, the broadcast one the mask
        xb, mask, kind = a, b, "add"
        replaced.append(inp)
    elif _is_fn(inp, _MASKED_FILL, "masked_fill") and _only_user(inp, n) and len(inp.args) == 3 \
            and isinstance(inp.args[2], (int, float)) and isinstance(inp.args[1], fx.Node):
        xb, mask, kind, fill = inp.args[0], inp.args[1], "fill", float(inp.args[2])
        replaced.append(inp)
    scale_node, sc = xb, _scalar_scale(xb, replaced[-1])
    scale, divide = None, False
    if sc is not None:
        xb, scale, divide = sc
        replaced.append(scale_node)
    if scale is None and kind == "none":
        return False
    g = gm.graph
    fused = _fused_node(g, n, "scale_mask_softmax", fused_ops.scale_mask_softmax, (xb,),
                        {"scale": scale, "divide": divide, "mask": mask, "mask_kind": kind,
                         "fill_value": fill, "dim": dim}, n, replaced)
    n.replace_all_uses_with(fused)
    _erase(g, replaced)
    return True


def _dropout(gm: fx.GraphModule, n: Any) -> tuple[float, bool] | None:
    if not isinstance(n, fx.Node):
        return None
    mod = _module(gm, n)
    if isinstance(mod, nn.Dropout):
        # the flag is read now, as capture itself bakes `self.training` into traced graphs
        return (float(mod.p), bool(mod.training)) if not mod.inplace else None
    if _is_fn(n, _DROPOUT):
        p, train = _arg(n, 1, "p", 0.5), _arg(n, 2, "training", _arg(n, 2, "train", True))
        if _arg(n, 3, "inplace", False) or not isinstance(p, (int, float)) or not isinstance(train, bool):
            return None
        return float(p), train
    return None


def _fuse_dropout_add(gm: fx.GraphModule, n: fx.Node) -> bool:
    if not _tensor_add(n):
        return False
    a, b = n.args
    da, db = _dropout(gm, a), _dropout(gm, b)
    if da is not None and _only_user(a, n):
        d, res, (p, train) = a, b, da
    elif db is not None and _only_user(b, n):
        d, res, (p, train) = b, a, db
    else:
        return False
    if d is res:
        return False
    x = d.args[0] if d.args else d.kwargs.get("input")
    sx, sr = _shape(x), _shape(res)
    if sx is not None and sr is not None and sx != sr:
        return False
    g = gm.graph
    fused = _fused_node(g, n, "dropout_add", fused_ops.dropout_add, (x, res, p, train), {}, n, [n, d])
    n.replace_all_uses_with(fused)
    _erase(g, [n, d])
    return True


# ---- general elementwise chains ----------------------------------------------------------

# graph target -> chain op name; binary ops take (a, b) in that order
_CHAIN_FUNCTIONS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", _aten.add.Tensor: "add", _aten.add.Scalar: "add",
    operator.sub: "sub", torch.sub: "sub", _aten.sub.Tensor: "sub", _aten.sub.Scalar: "sub",
    operator.mul: "mul", torch.mul: "mul", _aten.mul.Tensor: "mul", _aten.mul.Scalar: "mul",
    operator.truediv: "div", torch.div: "div", _aten.div.Tensor: "div", _aten.div.Scalar: "div",
    operator.neg: "neg", torch.neg: "neg", _aten.neg.default: "neg",
    torch.exp: "exp", _aten.exp.default: "exp", torch.log: "log", _aten.log.default: "log",
    torch.sqrt: "sqrt", _aten.sqrt.default: "sqrt", torch.rsqrt: "rsqrt", _aten.rsqrt.default: "rsqrt",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", _aten.sigmoid.default: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", _aten.tanh.default: "tanh",
    torch.relu: "relu", F.relu: "relu", _aten.relu.default: "relu",
    F.gelu: "gelu", torch._C._nn.gelu: "gelu", _aten.gelu.default: "gelu",
    F.silu: "silu", _aten.silu.default: "silu",
    operator.pow: "pow", torch.pow: "pow", _aten.pow.Tensor_Scalar: "pow",
}
_CHAIN_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg", "exp": "exp", "log": "log",
                  "sqrt": "sqrt", "rsqrt": "rsqrt", "sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "pow": "pow"}
_CHAIN_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu"}
_ALLOWED_KWARGS = {"alpha": 1, "approximate": None, "inplace": False, "rounding_mode": None}


def _float_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _chain_op(gm: fx.GraphModule, n: fx.Node) -> tuple[str, list[Any]] | None:
    """(op, operands) when `n` is one elementwise op a chain can hold, else None.

    Operands are graph nodes holding floating tensors or Python numbers (as floats)."""
    if n.op == "call_module":
        mod = _module(gm, n)
        name = next((v for k, v in _CHAIN_MODULES.items() if type(mod) is k), None)
        if name is None or getattr(mod, "inplace", False) or len(n.args) != 1 or n.kwargs:
            return None
        if name == "gelu":
            name = {"none": "gelu", "tanh": "gelu_tanh"}.get(mod.approximate)
        args: list[Any] = [n.args[0]] if name else []
    elif n.op == "call_function":
        try:
            name = _CHAIN_FUNCTIONS.get(n.target)
        except TypeError:  # unhashable target
            return None
        args = list(n.args)
    elif n.op == "call_method":
        name = _CHAIN_METHODS.get(str(n.target))
        args = list(n.args)
    else:
        return None
    if name is None:
        return None
    kwargs = dict(n.kwargs)
    for k, v in kwargs.items():
        if k == "approximate" and name == "gelu" and v in ("none", "tanh"):
            continue
        if k not in _ALLOWED_KWARGS or v != _ALLOWED_KWARGS[k]:
            return None
    if name == "gelu":
        approx = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        args = args[:1]
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approx) if isinstance(approx, str) else None
        if name is None:
            return None
    if name == "add" or name == "sub":
        args = args[:2] if len(args) == 2 or (len(args) == 3 and args[2] == 1) else []
    arity = 2 if name in ("add", "sub", "mul", "div", "pow") else 1
    if len(args) != arity:
        return None
    out: list[Any] = []
    for a in args:
        if isinstance(a, fx.Node):
            if not _float_tensor(_val(a)):
                return None
            out.append(a)
        elif isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a):
            out.append(float(a))
        else:
            return None
    if all(not isinstance(a, fx.Node) for a in out):
        return None
    if name == "pow" and not isinstance(out[1], float):
        return None  # a tensor exponent is not in the kernels' derivative table
    if not _float_tensor(_val(n)):
        return None
    return name, out


def _fuse_chain(gm: fx.GraphModule, tail: fx.Node) -> bool:
    """Grow a chain backwards from `tail` over producers that only the chain reads; fuse >= 2 ops."""
    first = _chain_op(gm, tail)
    shape, dtype = _shape(tail), getattr(_val(tail), "dtype", None)
    if first is None or shape is None:
        return False
    ops = {tail: first}
    grew = True
    while grew:
        grew = False
        for node in list(ops):
            for a in ops[node][1]:
                if not isinstance(a, fx.Node) or a in ops or a.meta.get("fxpipe.fused"):
                    continue
                # an intermediate must be read by the chain only and be as large as the output
                # (a smaller one would be recomputed per element) with the same dtype
                if not all(u in ops for u in a.users) or _shape(a) != shape or _val(a).dtype != dtype:
                    continue
                op = _chain_op(gm, a)
                if op is not None:
                    ops[a] = op
                    grew = True
    if len(ops) < 2:
        return False
    order = {m: i for i, m in enumerate(gm.graph.nodes)}
    chain = sorted(ops, key=order.__getitem__)
    inputs: list[fx.Node] = []
    for node in chain:
        for a in ops[node][1]:
            if isinstance(a, fx.Node) and a not in ops and a not in inputs:
                if _val(a).dtype != dtype:
                    return False  # mixed precision: leave torch's type promotion to torch
                inputs.append(a)
    index = {node: f"v{k}" for k, node in enumerate(chain)}
    steps = [ChainStep(ops[node][0], tuple(index[a] if a in index else (f"i{inputs.index(a)}" if isinstance(a, fx.Node)
                                                                        else a) for a in ops[node][1]))
             for node in chain]
    program = format_program(steps)
    g = gm.graph
    fused = _fused_node(g, tail, "elementwise_chain", fused_ops.elementwise_chain, (program, *inputs), {}, tail, chain)
    tail.replace_all_uses_with(fused)
    _erase(g, reversed(chain))
    return True


_MATCHERS = {
    "add_layer_norm": _fuse_add_layer_norm,
    "bias_gelu": _fuse_bias_gelu,
    "scale_mask_softmax": _fuse_scale_mask_softmax,
    "dropout_add": _fuse_dropout_add,
    "elementwise_chain": _fuse_chain,
}


def fuse_elementwise(gm: fx.GraphModule, patterns: Iterable[str] | None = None) -> FuseResult:
    """Replace fusable chains of `gm` by calls to `fxpipe.cuda.fused_ops`.

    Reads `node.meta["fxpipe.val"]` where present (shapes decide the bias and mask operands and
    check the LayerNorm axis); works without it on structure alone. Mutates `gm` in place:
    fused nodes are named `fused_<pattern>`, carry the replaced tail's meta (module stack,
    value) and the sum of the replaced nodes' FLOPs, and `meta["fxpipe.fused"]` = pattern.

    Args:
        gm: graph from `compiler.capture` (either path), optionally after `propagate_shapes`.
        patterns: names from `PATTERNS` to apply, in that priority order (default: all).

    Returns:
        FuseResult(gm, modified, fused): one pattern name per fusion made, in graph order
        per pattern.

    Example:
        >>> class M(torch.nn.Module):
        ...     def forward(self, x, b):
        ...         return torch.nn.functional.gelu(x + b)
        >>> res = fuse_elementwise(fx.symbolic_trace(M()))
        >>> res.fused
        ['bias_gelu']
    """
    chosen = tuple(PATTERNS if patterns is None else patterns)
    unknown = [p for p in chosen if p not in _MATCHERS]
    if unknown:
        from fxpipe.errors import PlanError

        raise PlanError(f"unknown fusion pattern(s) {unknown}; known: {list(PATTERNS)}")
    fused: list[str] = []
    for name in PATTERNS:
        if name not in chosen:
            continue
        nodes = list(gm.graph.nodes)
        if name == "elementwise_chain":
            nodes.reverse()  # grow from a chain's last op, so one chain is one fused op
        for node in nodes:
            if getattr(node, "_erased", False) or node.op not in ("call_function", "call_module", "call_method"):
                continue
            if node.meta.get("fxpipe.fused"):
                continue
            if _MATCHERS[name](gm, node):
                fused.append(name)
    if fused:
        gm.graph.lint()
        gm.recompile()
    return FuseResult(gm, bool(fused), fused)
