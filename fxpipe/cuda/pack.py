"""Coalesce a boundary's tensors into one contiguous byte buffer with one kernel launch.

A pipeline boundary often carries several tensors (hidden states, a mask, position ids). The
distributed runtime sends one buffer per boundary (`runtime/distributed.py`
`BoundaryLayout.pack`); filling it with one ``copy_`` per tensor costs one launch each and,
for small tensors, more host time than copy time. `pack_into` copies up to `SLOTS` tensors
per launch: block row y of the grid copies tensor y with 16-byte accesses when its source,
destination and size allow it, bytes otherwise. Unpacking needs no kernel: the receiver's
tensors are views into the buffer.

Without CUDA or CuPy (and for a single tensor, where one copy is already one launch) it
falls back to ``copy_`` per tensor, with the same result.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch

from fxpipe.cuda import kernels as K

__all__ = ["pack_into", "SLOTS"]

SLOTS = 8  # tensors per launch; more are packed in several launches

_SOURCE = r"""
extern "C" __global__ void pack_slots(unsigned char* __restrict__ dst, %(params)s) {
    const unsigned char* src; long long off, n;
    switch (blockIdx.y) {
%(cases)s
        default: return;
    }
    unsigned char* d = dst + off;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    if ((((unsigned long long)src | (unsigned long long)d) & 15ull) == 0) {
        const long long n16 = n >> 4;
        for (long long i = tid; i < n16; i += stride)
            ((uint4*)d)[i] = ((const uint4*)src)[i];
        for (long long i = (n16 << 4) + tid; i < n; i += stride) d[i] = src[i];
    } else {
        for (long long i = tid; i < n; i += stride) d[i] = src[i];
    }
}
"""


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    params = ", ".join(f"const unsigned char* s{k}, long long o{k}, long long n{k}" for k in range(SLOTS))
    cases = "\n".join(f"        case {k}: src = s{k}; off = o{k}; n = n{k}; break;" for k in range(SLOTS))
    mod = K._compile(_SOURCE % {"params": params, "cases": cases}, "pack", "the boundary pack kernel")
    return mod.get_function("pack_slots")


def pack_into(buf: torch.Tensor, parts: Sequence[tuple[torch.Tensor, int]]) -> None:
    """Copy each (tensor, byte offset) of `parts` into the uint8 tensor `buf` at its offset.

    The tensors must be on `buf`'s device; non-contiguous ones are made contiguous first.

    Example (CPU: one ``copy_`` per tensor):
        >>> buf = torch.zeros(16, dtype=torch.uint8)
        >>> pack_into(buf, [(torch.ones(2, dtype=torch.int32), 0), (torch.full((2,), 2, dtype=torch.int16), 8)])
        >>> buf.tolist()[:12]
        [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 2, 0]
    """
    items = [(t.detach().contiguous(), off) for t, off in parts if t.numel()]
    for t, off in items:
        if t.device != buf.device:
            raise ValueError(f"pack_into: a tensor on {t.device} cannot be packed into a buffer on {buf.device}")
        if off < 0 or off + t.numel() * t.element_size() > buf.numel():
            raise ValueError(f"pack_into: {t.numel() * t.element_size()} bytes at offset {off} overflow a "
                             f"{buf.numel()}-byte buffer")
    if len(items) < 2 or buf.device.type != "cuda" or not K.available():
        for t, off in items:
            nb = t.numel() * t.element_size()
            buf[off:off + nb].copy_(t.reshape(-1).view(torch.uint8))
        return
    cp = K._cupy()
    kern = _kernel()
    index = buf.device.index or 0
    for start in range(0, len(items), SLOTS):
        chunk = items[start:start + SLOTS]
        args: list[Any] = [np.uint64(buf.data_ptr())]
        biggest = 0
        for k in range(SLOTS):
            if k < len(chunk):
                t, off = chunk[k]
                nb = t.numel() * t.element_size()
                args += [np.uint64(t.data_ptr()), np.int64(off), np.int64(nb)]
                biggest = max(biggest, nb)
            else:
                args += [np.uint64(0), np.int64(0), np.int64(0)]
        blocks = max(1, min(-(-biggest // (256 * 16)), K._sm_count(index) * 4))
        with cp.cuda.Device(index), K._stream(index):
            kern((blocks, len(chunk)), (256,), tuple(args))
