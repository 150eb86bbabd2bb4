"""Elementwise chains: a small expression program, its eager meaning and its CUDA kernels.

`passes/fuse_elementwise.py` turns a run of elementwise ops (``0.5 * x * (1 + tanh(c * (x +
0.044715 * x ** 3)))``, ``silu(g) * u``, ...) into one call ``elementwise_chain(program,
*inputs)``. The program is a string, so fx code generation can print it and a plan can name
it; one step per op, separated by ``;``::

    mul(i0,0.5);pow(i0,3.0);mul(v1,0.044715);add(i0,v2);mul(v3,0.7978845608028654);tanh(v4);add(v5,1.0);mul(v0,v6)

``iK`` is input K, ``vK`` the result of step K, anything else a float constant; the last step
is the output. `run_eager` evaluates it with the same torch ops in the same order as the
graph it came from (CPU, meta and fake tensors get the unfused numbers exactly).
`kernel_source` writes the CUDA forward and backward: the forward computes every step in fp32
registers and stores only the output; the backward reads the inputs and dy, recomputes the
steps and accumulates each input's gradient in reverse order (derivatives below), so nothing
but the inputs is saved for backward.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fxpipe.errors import FxpipeError

__all__ = ["OPS", "ChainStep", "parse_program", "format_program", "run_eager", "kernel_source", "BROADCAST_MODES"]


@dataclass(frozen=True)
class _Op:
    arity: int
    eager: Callable[..., Any]
    cuda: str  # forward expression; {0} {1} operands
    grads: tuple[str | None, ...]  # d(result)/d(operand k); {r} is the result; None: no gradient


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


OPS: dict[str, _Op] = {
    "add": _Op(2, operator.add, "({0} + {1})", ("1.f", "1.f")),
    "sub": _Op(2, operator.sub, "({0} - {1})", ("1.f", "-1.f")),
    "mul": _Op(2, operator.mul, "({0} * {1})", ("{1}", "{0}")),
    "div": _Op(2, operator.truediv, "({0} / {1})", ("(1.f / {1})", "(-{r} / {1})")),
    "neg": _Op(1, operator.neg, "(-{0})", ("-1.f",)),
    "exp": _Op(1, torch.exp, "exp_k({0})", ("{r}",)),
    "log": _Op(1, torch.log, "logf({0})", ("(1.f / {0})",)),
    "sqrt": _Op(1, torch.sqrt, "sqrtf({0})", ("(0.5f / {r})",)),
    "rsqrt": _Op(1, torch.rsqrt, "rsqrtf({0})", ("(-0.5f * {r} * {r} * {r})",)),
    "sigmoid": _Op(1, torch.sigmoid, "(1.f / (1.f + exp_k(-{0})))", ("({r} * (1.f - {r}))",)),
    "tanh": _Op(1, torch.tanh, "tanh_k({0})", ("(1.f - {r} * {r})",)),
    "relu": _Op(1, torch.relu, "relu_f({0})", ("({0} > 0.f ? 1.f : 0.f)",)),
    "gelu": _Op(1, F.gelu, "gelu_f({0}, 0)", ("gelu_grad({0}, 0)",)),
    "gelu_tanh": _Op(1, _gelu_tanh, "gelu_f({0}, 1)", ("gelu_grad({0}, 1)",)),
    "silu": _Op(1, F.silu, "({0} / (1.f + exp_k(-{0})))", ("silu_grad({0})",)),
    # the exponent is always a constant (the pass only fuses x ** c)
    "pow": _Op(2, torch.pow, "pow_f({0}, {1})", ("({1} * pow_f({0}, {1} - 1.f))", None)),
}

# How an input is indexed by the kernels: same shape as the output, one value, or a vector
# along the last dimension (a bias). Other broadcasts are expanded to the output first.
BROADCAST_MODES = ("full", "scalar", "row")


@dataclass(frozen=True)
class ChainStep:
    """One op of a chain: its name and operands ("i<k>" input, "v<k>" step, or a float)."""

    op: str
    operands: tuple[str | float, ...]


class ChainProgramError(FxpipeError):
    """A chain program string that does not parse (a damaged plan or a hand-written call)."""


def format_program(steps: list[ChainStep]) -> str:
    """The program string of `steps` (inverse of `parse_program`)."""
    def operand(x: str | float) -> str:
        return x if isinstance(x, str) else repr(float(x))

    return ";".join(f"{s.op}({','.join(operand(a) for a in s.operands)})" for s in steps)


@functools.lru_cache(maxsize=1024)
def parse_program(program: str) -> tuple[tuple[ChainStep, ...], int]:
    """(steps, number of inputs) of a program string; ChainProgramError when malformed.

    Example:
        >>> parse_program("silu(i0);mul(v0,i1)")[1]
        2
    """
    steps: list[ChainStep] = []
    n_inputs = 0
    for k, text in enumerate(program.split(";")):
        name, sep, rest = text.partition("(")
        if not sep or not rest.endswith(")") or name not in OPS:
            raise ChainProgramError(f"elementwise chain step {k} {text!r} is not op(operands) with a known op "
                                    f"({', '.join(OPS)})")
        ops: list[str | float] = []
        for a in rest[:-1].split(","):
            if a[:1] in ("i", "v") and a[1:].isdigit():
                idx = int(a[1:])
                if a[0] == "v" and idx >= k:
                    raise ChainProgramError(f"elementwise chain step {k} reads v{idx} before it is computed")
                if a[0] == "i":
                    n_inputs = max(n_inputs, idx + 1)
                ops.append(a)
            else:
                try:
                    c = float(a)
                except ValueError:
                    raise ChainProgramError(f"elementwise chain step {k}: operand {a!r} is neither iK, vK nor a number") from None
                if not math.isfinite(c):
                    raise ChainProgramError(f"elementwise chain step {k}: constant {a!r} is not finite")
                ops.append(c)
        if len(ops) != OPS[name].arity:
            raise ChainProgramError(f"elementwise chain step {k}: {name} takes {OPS[name].arity} operand(s), got {len(ops)}")
        if name == "pow" and not isinstance(ops[1], float):
            raise ChainProgramError(f"elementwise chain step {k}: pow needs a constant exponent")
        if all(isinstance(o, float) for o in ops):
            raise ChainProgramError(f"elementwise chain step {k}: {text!r} has only constants")
        steps.append(ChainStep(name, tuple(ops)))
    if not steps or program == "":
        raise ChainProgramError("empty elementwise chain program")
    return tuple(steps), n_inputs


def run_eager(program: str, inputs: tuple[Any, ...]) -> Any:
    """Evaluate the program with torch ops, step by step (autograd records each op)."""
    steps, n_inputs = parse_program(program)
    if len(inputs) != n_inputs:
        raise ChainProgramError(f"elementwise chain program reads {n_inputs} inputs, {len(inputs)} given")
    vals: list[Any] = []

    def get(a: str | float) -> Any:
        if isinstance(a, float):
            return a
        return inputs[int(a[1:])] if a[0] == "i" else vals[int(a[1:])]

    for s in steps:
        vals.append(OPS[s.op].eager(*(get(a) for a in s.operands)))
    return vals[-1]


# ---- CUDA source ---------------------------------------------------------------------------

_HELPERS = r"""
__device__ __forceinline__ float relu_f(float v) { return (v > 0.f || v != v) ? v : 0.f; }
__device__ __forceinline__ float silu_grad(float v) {
    float s = 1.f / (1.f + exp_k(-v));
    return s * (1.f + v * (1.f - s));
}
__device__ __forceinline__ float pow_f(float a, float e) {
    if (e == 2.f) return a * a;
    if (e == 3.f) return a * a * a;
    if (e == 1.f) return a;
    if (e == 0.f) return 1.f;
    return powf(a, e);
}
"""


def _literal(c: float) -> str:
    text = repr(float(c))
    return text + ("f" if ("." in text or "e" in text) else ".f")


def kernel_source(program: str, modes: tuple[str, ...], need: tuple[bool, ...]) -> str:
    """CUDA source (after the shared prelude of `kernels.py`, which defines T, Pack of VEC
    values, U and MINB) of `chain_fwd` and `chain_bwd`.

    `modes[k]` says how input k is indexed (`BROADCAST_MODES`); `need[k]` whether the
    backward writes input k's gradient (a full-size buffer, summed to the input's shape by
    the caller). Each thread handles U vectors of VEC values per step of a grid-stride loop,
    loads them all before computing (memory-level parallelism); a "row" input is loaded once
    per thread when the grid keeps every thread on the same columns (`fixed_col`), else once
    per vector. Signatures (nv = elements / VEC, cols = last dimension):
        chain_fwd(in0.., out, nv, cols, fixed_col)
        chain_bwd(in0.., dy, g<k> for needed k.., nv, cols, fixed_col)
    """
    steps, n_inputs = parse_program(program)
    if len(modes) != n_inputs or len(need) != n_inputs or any(m not in BROADCAST_MODES for m in modes):
        raise ChainProgramError(f"kernel_source: {n_inputs} inputs need {n_inputs} modes and flags, got {modes}, {need}")

    def ref(a: str | float) -> str:
        return _literal(a) if isinstance(a, float) else (f"a{a[1:]}" if a[0] == "i" else f"v{a[1:]}")

    full = [k for k, m in enumerate(modes) if m == "full"]
    rows = [k for k, m in enumerate(modes) if m == "row"]
    scalars = [k for k, m in enumerate(modes) if m == "scalar"]
    ins = ", ".join(f"const T* __restrict__ in{k}" for k in range(n_inputs))
    last = len(steps) - 1
    outs = [k for k in range(n_inputs) if need[k]]

    def kernel(name: str, params: str, extra_full: list[str], compute: list[str], stores: list[str]) -> str:
        # extra_full: names of further full-size operands read as packs (dy)
        head = [f'extern "C" __global__ void __launch_bounds__(256, MINB) {name}({params}, long long nv, '
                "long long cols, int fixed_col) {",
                "    const long long stride = (long long)gridDim.x * blockDim.x;",
                "    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;"]
        head += [f"    const float s{k} = ld(in{k}[0]);" for k in scalars]
        for k in rows:
            head += [f"    Pack r{k};",
                     f"    if (fixed_col && first < nv) r{k} = *(const Pack*)(in{k} + (first * VEC) % cols);"]
        loads = [f"in{k}" for k in full] + extra_full
        loop = ["    for (long long i0 = first; i0 < nv; i0 += stride * U) {"]
        loop += [f"        Pack p_{n}[U];" for n in loads]
        loop += ["        #pragma unroll", "        for (int u = 0; u < U; ++u) {",
                 "            const long long i = i0 + u * stride;",
                 "            if (i < nv) {" + " ".join(f"p_{n}[u] = ((const Pack*)({n}))[i];" for n in loads) + "}",
                 "        }",
                 "        #pragma unroll", "        for (int u = 0; u < U; ++u) {",
                 "            const long long i = i0 + u * stride;",
                 "            if (i >= nv) continue;"]
        for k in rows:
            loop += [f"            Pack q{k} = r{k};",
                     f"            if (!fixed_col) q{k} = *(const Pack*)(in{k} + (i * VEC) % cols);"]
        loop += [f"            Pack o_{n};" for n in stores]
        loop += ["            #pragma unroll", "            for (int e = 0; e < VEC; ++e) {"]
        for k, m in enumerate(modes):
            src = {"full": f"ld(p_in{k}[u].e[e])", "row": f"ld(q{k}.e[e])", "scalar": f"s{k}"}[m]
            loop.append(f"                const float a{k} = {src};")
        loop += ["                " + c for c in compute]
        loop += ["            }"]
        loop += [f"            ((Pack*)({n}))[i] = o_{n};" for n in stores]
        loop += ["        }", "    }", "}"]
        return "\n".join(head + loop) + "\n"

    body = [f"const float v{j} = {OPS[s.op].cuda.format(*(ref(a) for a in s.operands))};" for j, s in enumerate(steps)]
    fwd = kernel("chain_fwd", f"{ins}, T* __restrict__ out", [], body + [f"o_out.e[e] = st(v{last});"], ["out"])

    # reverse mode: gv<j> is d(out)/d(v<j>), ga<k> d(out)/d(input k)
    back = [f"float gv{last} = ld(p_dy[u].e[e]);"]
    back += [f"float gv{j} = 0.f;" for j in range(last)]
    back += [f"float ga{k} = 0.f;" for k in range(n_inputs)]
    for j in range(last, -1, -1):
        st_ = steps[j]
        for pos, a in enumerate(st_.operands):
            g = OPS[st_.op].grads[pos]
            if isinstance(a, float) or g is None:
                continue
            target = f"ga{a[1:]}" if a[0] == "i" else f"gv{a[1:]}"
            d = g.format(*(ref(x) for x in st_.operands), r=f"v{j}")
            back.append(f"{target} += gv{j} * {d};")
    back += [f"o_g{k}.e[e] = st(ga{k});" for k in outs]
    gparams = "".join(f", T* __restrict__ g{k}" for k in outs)
    bwd = kernel("chain_bwd", f"{ins}, const T* __restrict__ dy{gparams}", ["dy"], body + back, [f"g{k}" for k in outs])
    return _HELPERS + fwd + bwd
