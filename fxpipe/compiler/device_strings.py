"""Device strings -> devices: "cpu", "cuda:N", "meta", and GPU presets ("h100") for offline planning.

`Cluster.from_devices` hands each string here: a local device gets its numbers from this
machine (`local_machine`, torch's CUDA properties), a list of presets becomes a
`Cluster.preset` per run of one kind. Kept apart from the `Device`/`Cluster` types, which
describe devices without ever probing one.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from fxpipe.compiler.cluster import Cluster, Device
from fxpipe.compiler.gpu_presets import CUDA_PRESETS, GiB
from fxpipe.compiler.local_machine import cpu_calibration, host_memory
from fxpipe.errors import PlanError

__all__ = ["device_kind", "device_from_string", "preset_cluster"]


def device_kind(name: str) -> str:
    """The kind of a device string: 'cuda:1' -> 'cuda'."""
    return name.split(":")[0]


def device_from_string(name: str, n_cpu: int, memory: float | None) -> Device:
    """The `Device` for a torch device string, one of `n_cpu` CPU workers; PlanError when it names no
    device of this machine."""
    import torch

    kind = device_kind(name)
    if kind not in ("cpu", "cuda", "meta"):
        raise PlanError(f"unknown device {name!r}: use 'cpu', 'cuda', 'cuda:N', 'meta' (planning only), a GPU "
                        f"preset for offline planning ({', '.join(map(repr, CUDA_PRESETS))}), or a fxpipe.Device "
                        "for anything else")
    try:
        torch.device(name)
    except RuntimeError:
        raise PlanError(f"device {name!r} is not a valid torch device string; write e.g. 'cpu', 'cuda:0' or 'meta'") from None
    if kind == "cpu":
        cal = cpu_calibration()
        threads = max(1, (os.cpu_count() or 1) // max(1, n_cpu))
        mem = memory if memory is not None else host_memory() / max(1, n_cpu)
        return Device(name, "cpu", cal["flops_per_thread"] * threads, cal["copy_bandwidth"],
                      mem, cal["launch_overhead"], threads, host_memory=host_memory())
    if kind == "cuda":
        idx = torch.device(name).index or 0
        if not torch.cuda.is_available():
            raise PlanError(f"device {name!r} does not exist: CUDA is not available on this machine; "
                            "use 'cpu' devices, or plan offline for GPUs with a GPU preset (devices=['h100'] * 2, "
                            "`fxpipe plan --devices 'h100*2'`; also 'h200', 'a100', 'l4'), a cluster file "
                            "(`fxpipe plan --cluster FILE.json`) or a Cluster of fxpipe.Device values")
        n = torch.cuda.device_count()
        if idx >= n:
            raise PlanError(f"device {name!r} does not exist: this machine has {n} CUDA device(s); "
                            f"use {'cuda:0' if n == 1 else f'cuda:0 .. cuda:{n - 1}'}")
        props = torch.cuda.get_device_properties(idx)
        preset = next((v for k, v in CUDA_PRESETS.items() if k in props.name.lower()), CUDA_PRESETS["a100"])
        mem = memory if memory is not None else props.total_memory * 0.9
        return Device(f"cuda:{idx}", "cuda", preset["peak_flops"], preset["mem_bandwidth"], mem, 8e-6, 1,
                      host_bandwidth=preset["host_bandwidth"], host_memory=host_memory())
    if kind == "meta":
        return Device(name, "meta", 1e12, 1e11, memory or 16 * GiB, 5e-6, 1)
    raise AssertionError(f"unreachable: device kind {kind!r}")


def preset_cluster(devices: Sequence[Any], memory: float | None) -> "Cluster":
    """GPUs named by preset ('h100' x 64, 'a100', ...) for offline planning: `Cluster.preset`
    per run of one kind, 8 to a node, runs joined by `Cluster.concat`'s default network."""
    runs: list[list[str]] = []
    for d in devices:
        key = d.lower() if isinstance(d, str) else None
        if key is not None and key.split(":")[0] in CUDA_PRESETS and key not in CUDA_PRESETS:
            raise PlanError(f"device {d!r}: a GPU preset names a kind of GPU, not one device; write "
                            f"{key.split(':')[0]!r} once per GPU (e.g. '{key.split(':')[0]}*8' on the CLI)")
        if key not in CUDA_PRESETS:
            what = f"{d!r}" if isinstance(d, str) else f"fxpipe.Device {getattr(d, 'name', d)!r}"
            raise PlanError(f"device {what} mixed with GPU presets ({', '.join(map(repr, CUDA_PRESETS))}): presets "
                            "describe GPUs for offline planning and cannot sit beside other devices; list only "
                            "presets (e.g. 'h100*8,a100*8' on the CLI), or write a cluster file with every device")
        if runs and runs[-1][0] == key:
            runs[-1].append(key)
        else:
            runs.append([key])
    cluster = None
    for run in runs:
        part = Cluster.preset(run[0], len(run), memory=memory)
        cluster = part if cluster is None else Cluster.concat(cluster, part)
    return cluster
