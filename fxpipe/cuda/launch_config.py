"""Launch shape of the CUDA kernels: vector width per dtype and size (`vec_width`), a row
kernel's threads and vectors per thread (`row_config`), the elementwise grid
(`elementwise_grid`) and the tuned knobs behind them (`TUNING`, chosen by
`benchmarks/cuda_kernels.py --sweep`).

Kept apart from `kernels.py` (compile, cache, launch through CuPy): choosing a launch shape
is plain arithmetic over torch dtypes and the device's SM count, needs no CuPy, and is what
the benchmark's sweep changes. `kernels` re-exports every name here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["MAX_CHUNKS_PER_THREAD", "vec_width", "row_config", "Tuning", "TUNING", "set_tuning", "elementwise_grid"]

MAX_CHUNKS_PER_THREAD = 8  # rows longer than 1024 threads x 8 vectors run the eager fallback


def vec_width(dtype: torch.dtype, *sizes: int) -> int:
    """Values per 16-byte access for `dtype`, or 1 when a size is not a multiple of it."""
    v = 16 // torch.empty((), dtype=dtype).element_size()
    return v if all(s % v == 0 for s in sizes) else 1


def row_config(cols: int, vec: int, per_thread: int = 16) -> tuple[int, int] | None:
    """(threads, vectors per thread) holding a row of `cols` in registers, about `per_thread`
    values per thread, or None when the row is too long for registers."""
    chunks = -(-cols // vec)
    threads = min(1024, max(32, 1 << max(0, math.ceil(math.log2(max(1, cols / per_thread))))))
    nv = -(-chunks // threads)
    return None if nv > MAX_CHUNKS_PER_THREAD else (threads, nv)


@dataclass
class Tuning:
    """Launch shape of the elementwise kernels (fused ops and chains).

    unroll: vectors each thread loads before it computes (memory-level parallelism).
    min_blocks: 256-thread blocks per SM the compiler must fit (`__launch_bounds__`), which
        caps registers per thread at 65536 / (256 * min_blocks).
    waves: the grid is waves x SMs x min_blocks blocks; threads stride over the rest.
    ln_values, softmax_vectors: how much of a row each thread of a row kernel holds (fewer:
        bigger blocks; more: more rows in flight per SM).
    Chosen by `benchmarks/cuda_kernels.py --sweep` on an H100 (see its results).
    """

    unroll: int = 1
    min_blocks: int = 8
    waves: int = 8
    # row kernels: values per thread of a LayerNorm row, 16-byte vectors per thread of a softmax row
    ln_values: int = 8
    softmax_vectors: int = 2


TUNING = Tuning()


def set_tuning(**fields: int) -> None:
    """Change `TUNING` (for the benchmark's sweep); later launches compile kernels for it."""
    for k, v in fields.items():
        if not hasattr(TUNING, k) or not isinstance(v, int) or v < 1:
            raise ValueError(f"set_tuning: {k}={v!r} is not a Tuning field with a positive integer")
        setattr(TUNING, k, v)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def elementwise_grid(nv: int, device: torch.device, row_vectors: int | None = None) -> tuple[int, int]:
    """(blocks of 256 threads, fixed_col) for `nv` vectors: `TUNING.waves` full waves of the
    device (`TUNING.min_blocks` blocks per SM), grid-stride beyond. With `row_vectors`, the
    grid is rounded so that the thread count is a multiple of it (fixed_col = 1: every thread
    keeps its columns)."""
    wave = _sm_count(device.index or 0) * TUNING.min_blocks * TUNING.waves
    blocks = max(1, min(-(-nv // (256 * TUNING.unroll)), wave))
    if row_vectors:
        g = row_vectors // math.gcd(row_vectors, 256)  # blocks must be a multiple of g
        if g <= wave * 2:
            return max(g, blocks // g * g), 1
    return blocks, 0
