"""Unit times per device: the unit x device matrices of seconds per microbatch that placement
and the partitioner read (plain, `device_unit_times`, and with weights streamed from the host,
`device_offload_unit_times`), the key measured times are filed under (`device_key`) and the
backward-to-forward factor of the roofline (`BWD_FACTOR`).

Each entry is `CostTable`'s own price (its roofline or measured time); this module only
builds the matrices, sharing one column between devices priced alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from fxpipe.compiler.cluster import Device

if TYPE_CHECKING:
    from fxpipe.passes.annotate_costs import CostTable

__all__ = ["BWD_FACTOR", "device_key", "device_unit_times", "device_offload_unit_times"]

BWD_FACTOR = 2.0  # backward ~ 2x forward: grad wrt input and grad wrt weight


def device_key(dev: Device) -> str:
    """What measured times are keyed by: devices with one key run a unit equally fast
    (CPU workers with the same thread count; a CUDA device by its name)."""
    return f"cpu/{dev.threads}t" if dev.kind == "cpu" else dev.name


def device_unit_times(table: CostTable, devices: Sequence[Device], train: bool) -> list[list[float]]:
    """unit x device matrix of seconds per microbatch."""
    # Devices priced alike (same roofline, no measured times of their own) share one column:
    # a 64-GPU cluster prices each unit once, not 64 times, for every order placement tries.
    columns: dict[tuple, list[float]] = {}
    per_device = []
    for d in devices:
        key = (device_key(d) if table.measured_for(d) is not None else None, d.peak_flops, d.mem_bandwidth,
               d.launch_overhead)
        if key not in columns:
            columns[key] = [table.unit_time(u, d, train) for u in range(len(table.unit_names))]
        per_device.append(columns[key])
    return [[col[u] for col in per_device] for u in range(len(table.unit_names))]


def device_offload_unit_times(table: CostTable, devices: Sequence[Device], train: bool,
                              plain: Sequence[Sequence[float]] | None = None) -> list[list[float]]:
    """unit x device matrix of seconds per microbatch when the unit's stage streams its
    weights from host memory: ``max(fwd, w / host_bandwidth)`` (+ ``max(bwd, w /
    host_bandwidth)`` when training). Written as `device_unit_times`' entry (`plain`, when the
    caller has it already) plus the copy time the compute cannot hide, so an entry is never
    below the plain one by rounding."""
    n = len(table.unit_names)
    if plain is None:
        plain = device_unit_times(table, devices, train)
    columns: dict[tuple, list[float]] = {}  # devices priced alike share a column (as device_unit_times)
    out = [list(row) for row in plain]
    for j, d in enumerate(devices):
        measured = table.measured_for(d)
        key = (device_key(d) if measured is not None else None, d.peak_flops, d.mem_bandwidth,
               d.launch_overhead, d.host_bandwidth)
        if key not in columns:
            col = []
            for u in range(n):
                w = table.weight_stream_time(u, d)
                f = table.fwd_time(u, d)
                b = measured[1][u] if measured is not None else f * BWD_FACTOR  # = bwd_time, priced once
                col.append(max(0.0, w - f) + (max(0.0, w - b) if train else 0.0))
            columns[key] = col
        for u in range(n):
            out[u][j] = plain[u][j] + columns[key][u]
    return out
