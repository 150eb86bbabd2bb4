"""CuPy kernels for the fused ops of `passes/fuse_elementwise.py`, forward and backward.

Every kernel reads and writes its tensors once: 16-byte vector loads and stores (4 fp32 or
8 fp16/bf16 values per access), arithmetic in fp32. Row kernels (LayerNorm, softmax) give one
block to a row and keep the row in registers, so a row is read from memory once even though
it is reduced twice. fp16 and bf16 are stored as 16-bit integers and converted by hand (PTX
`cvt` for fp16, bit shifts with round-to-nearest-even for bf16): no CUDA header is needed,
so NVRTC compiles the sources wherever CuPy runs.

Sources are generated per (kernel, dtype, vector width, row shape class) and compiled once;
`launch` runs them on torch's current stream and shares memory with torch through DLPack.

The CUDA text itself is in `kernel_sources.py` and the launch shape (`TUNING`, vector widths,
row and grid sizes) in `launch_config.py`; this module compiles, caches and launches, and
re-exports their names.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from fxpipe.cuda.kernel_sources import ELEMENTWISE as _ELEMENTWISE, PRELUDE as _PRELUDE, ROWS as _ROWS
from fxpipe.cuda.launch_config import (MAX_CHUNKS_PER_THREAD, TUNING, Tuning, _sm_count, elementwise_grid, row_config,
                                       set_tuning, vec_width)
from fxpipe.errors import FxpipeError

__all__ = ["available", "launch", "launch_chain", "SHARE", "row_config", "vec_width", "KernelCompileError", "DTYPES",
           "TUNING", "Tuning", "set_tuning", "kernel_resources"]
# launch_config's names (and its `_sm_count`, which fused_ops and pack call) stay importable from here
__all__ += ["MAX_CHUNKS_PER_THREAD", "elementwise_grid", "_sm_count"]

DTYPES = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16"}



class KernelCompileError(FxpipeError):
    """NVRTC rejected a generated kernel; the message carries the source path and a repro."""


@functools.lru_cache(maxsize=1)
def _cupy() -> Any:
    try:
        import cupy  # noqa: F401

        return cupy
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when CuPy imports and torch sees a CUDA device."""
    return torch.cuda.is_available() and _cupy() is not None


@functools.lru_cache(maxsize=None)
def _module(family: str, dtype_kind: str, vec: int, threads: int, nv: int, unroll: int, min_blocks: int) -> Any:
    src = (_PRELUDE % {"kind": dtype_kind, "vec": vec, "threads": threads, "nv": nv, "unroll": unroll,
                       "min_blocks": min_blocks}
           + (_ELEMENTWISE if family == "elementwise" else _ROWS) % {})
    return _compile(src, family, f"the fxpipe {family} kernels for {dtype_kind} (vec={vec}, threads={threads}, nv={nv})")


def _compile(src: str, tag: str, what: str) -> Any:
    """Compile a CuPy RawModule; on failure save the source and raise KernelCompileError with a repro."""
    cp = _cupy()
    try:
        mod = cp.RawModule(code=src, options=("-std=c++17",))
        mod.compile()
    except Exception as e:
        import hashlib
        import os
        import tempfile

        path = os.path.join(tempfile.gettempdir(), f"fxpipe_{tag}_{hashlib.sha1(src.encode()).hexdigest()[:12]}.cu")
        with open(path, "w") as f:
            f.write(src)
        raise KernelCompileError(
            f"NVRTC could not compile {what}: {e}\n  source: {path}\n  repro: python3 -c \"import cupy; "
            f"cupy.RawModule(code=open('{path}').read(), options=('-std=c++17',)).compile()\"") from e
    return mod


def _as_cupy(t: torch.Tensor) -> Any:
    cp = _cupy()
    t = t.detach()  # DLPack refuses tensors that require grad; memory is shared either way
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)  # 16-bit storage; the kernel converts (and DLPack needs no bf16)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return cp.from_dlpack(t)


# How tensors reach the kernels. Both share torch's memory (no copy). "pointer" passes the
# device address as a 64-bit argument; "dlpack" wraps every tensor as a CuPy array first,
# which costs tens of microseconds of host time per tensor and per call (measured in
# benchmarks/cuda_kernels.py), enough to make a 0.1 ms kernel host-bound.
SHARE = "pointer"


_FUNCS: dict[tuple, Any] = {}
_STREAMS: dict[tuple[int, int], Any] = {}


def _function(family: str, name: str, dtype: torch.dtype, vec: int, threads: int, nv: int) -> Any:
    key = (family, name, dtype, vec, threads, nv, TUNING.unroll, TUNING.min_blocks)
    fn = _FUNCS.get(key)
    if fn is None:
        fn = _FUNCS[key] = _module(family, DTYPES[dtype], vec, threads, nv, TUNING.unroll,
                                   TUNING.min_blocks).get_function(name)
    return fn


def kernel_resources(fn: Any) -> dict[str, int]:
    """Registers per thread and spilled (local) bytes of a compiled kernel, for the benchmark."""
    attrs = getattr(fn, "attributes", {}) or {}
    return {"regs": int(attrs.get("num_regs", -1)), "local_bytes": int(attrs.get("local_size_bytes", -1))}


def _stream(index: int) -> Any:
    ptr = torch.cuda.current_stream(index).cuda_stream
    st = _STREAMS.get((index, ptr))
    if st is None:
        import warnings

        cp = _cupy()
        with warnings.catch_warnings():  # ExternalStream is what CuPy 14 offers for a raw handle
            warnings.simplefilter("ignore", DeprecationWarning)
            st = _STREAMS[(index, ptr)] = cp.cuda.ExternalStream(ptr, index)
    return st


def launch(family: str, name: str, dtype: torch.dtype, vec: int, grid: int, threads: int, nv: int,
           args: list[Any]) -> None:
    """Run kernel `name` on torch's current stream; tensors share torch's memory (see SHARE).

    `args` holds torch tensors (None for an absent optional one, passed as a null pointer
    the kernel never reads: its flag is 0) and numpy scalars.
    """
    cp = _cupy()
    index = next(a for a in args if isinstance(a, torch.Tensor)).device.index or 0
    kern = _function(family, name, dtype, vec, threads if family == "rows" else 32, nv)
    with cp.cuda.Device(index), _stream(index):
        if SHARE == "dlpack":
            conv = tuple(_as_cupy(a) if isinstance(a, torch.Tensor) else (np.uint64(0) if a is None else a)
                         for a in args)
        else:
            conv = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else (np.uint64(0) if a is None else a)
                         for a in args)
        kern((grid,), (threads,), conv)


# ---- elementwise chains (sources generated per program by `cuda/chain.py`) ----------------

@functools.lru_cache(maxsize=256)
def _chain_functions(program: str, dtype_kind: str, modes: tuple[str, ...], need: tuple[bool, ...] | None,
                     vec: int, unroll: int, min_blocks: int) -> Any:
    from fxpipe.cuda.chain import kernel_source

    grads = need if need is not None else tuple(False for _ in modes)
    src = (_PRELUDE % {"kind": dtype_kind, "vec": vec, "threads": 256, "nv": 1, "unroll": unroll, "min_blocks": min_blocks}
           + kernel_source(program, modes, grads))
    mod = _compile(src, "chain", f"the elementwise chain {program!r} for {dtype_kind} (vec={vec})")
    return mod.get_function("chain_fwd" if need is None else "chain_bwd")


def chain_vec(tensors: list[torch.Tensor], modes: tuple[str, ...], n: int, cols: int) -> int:
    """Values per vector access for a chain launch: 16 bytes when every size it splits (the
    element count, and the row length if an input is a row) divides and every full or row
    operand is 16-byte aligned, else 1."""
    v = vec_width(tensors[0].dtype, n, *([cols] if "row" in modes else []))
    scalar_ops = {k for k, m in enumerate(modes) if m == "scalar"}
    if any(t.data_ptr() % 16 for k, t in enumerate(tensors) if k not in scalar_ops):
        return 1
    return v


def launch_chain(program: str, modes: tuple[str, ...], need: tuple[bool, ...] | None, tensors: list[torch.Tensor],
                 n: int, cols: int) -> None:
    """Run a chain's forward (`need` None) or backward kernel on torch's current stream.

    `tensors`: the inputs as `fused_ops._chain_operands` prepared them, then the output (forward)
    or dy and the needed gradient buffers (backward)."""
    cp = _cupy()
    dev = tensors[0].device
    index = dev.index or 0
    vec = chain_vec(tensors, modes, n, cols)
    kern = _chain_functions(program, DTYPES[tensors[0].dtype], modes, need, vec, TUNING.unroll, TUNING.min_blocks)
    nv = n // vec
    grid, fixed = elementwise_grid(nv, dev, cols // vec if "row" in modes else None)
    with cp.cuda.Device(index), _stream(index):
        kern((grid,), (256,), tuple(np.uint64(t.data_ptr()) for t in tensors)
             + (np.int64(nv), np.int64(cols), np.int32(fixed)))
