"""What the machine fxpipe runs on offers: CPU speed (calibrated once, cached on disk) and RAM.

`device_strings` turns "cpu" (and "cuda") into `Device` values with these numbers. Measuring
is kept apart from the cluster types, which never need the devices to exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fxpipe.compiler.gpu_presets import GiB

__all__ = ["cpu_calibration", "host_memory"]


def host_memory() -> float:
    """80% of this machine's RAM (8 GiB when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


_CAL_CACHE: dict[str, float] | None = None


def cpu_calibration() -> dict[str, float]:
    """Measure (once, then cache on disk) one CPU thread's matmul FLOP/s and copy bandwidth.

    The cache lives in $FXPIPE_CACHE_DIR (default ~/.cache/fxpipe) keyed by torch version and
    core count; delete it to re-measure.
    """
    global _CAL_CACHE
    if _CAL_CACHE is not None:
        return _CAL_CACHE
    import torch

    cache_dir = Path(os.environ.get("FXPIPE_CACHE_DIR", Path.home() / ".cache" / "fxpipe"))
    key = f"cpu-{torch.__version__}-{os.cpu_count()}"
    path = cache_dir / "calibration.json"
    try:
        data = json.loads(path.read_text())
        if key in data:
            _CAL_CACHE = data[key]
            return _CAL_CACHE
    except (OSError, ValueError):
        data = {}
    _CAL_CACHE = _measure_cpu()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        data[key] = _CAL_CACHE
        path.write_text(json.dumps(data, indent=1))
    except OSError:
        pass  # a read-only home only costs a re-measure next time
    return _CAL_CACHE


def _measure_cpu() -> dict[str, float]:
    import time

    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(384, 384)
        b = torch.randn(384, 384)
        for _ in range(2):
            a @ b
        reps, t0 = 6, time.perf_counter()
        for _ in range(reps):
            a @ b
        flops = 2 * 384**3 * reps / (time.perf_counter() - t0)
        src = torch.randn(4 * 1024 * 1024)  # 16 MiB
        dst = torch.empty_like(src)
        dst.copy_(src)
        reps, t0 = 5, time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        bw = 2 * src.numel() * 4 * reps / (time.perf_counter() - t0)
        x = torch.randn(8)
        reps, t0 = 200, time.perf_counter()
        for _ in range(reps):
            torch.add(x, x)
        launch = (time.perf_counter() - t0) / reps
    finally:
        torch.set_num_threads(prev)
    return {"flops_per_thread": flops, "copy_bandwidth": bw, "launch_overhead": launch}
