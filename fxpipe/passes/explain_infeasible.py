"""The `PlanError` message when no partition fits in memory.

It names the closest partition's overflowing stages (what each needs and why), the
devices' memory, and the remedy that can work for what overflows. Separate from the DP
(`partition_stages`, which finds the closest partition and raises) because it is report
text only.
"""

from __future__ import annotations

import math

from fxpipe.passes.partition_problem import Partition, PartitionProblem, replica_bytes
from fxpipe.passes.stage_variants import _checkpoint_bytes, _segment_sum, weight_buffer

__all__: list[str] = []  # private to the partitioner: `_infeasible_message`

_GiB = float(1024**3)


def _gib(x: float) -> str:
    text = f"{x / _GiB:.2f} GiB"
    if 0 < abs(x) < 0.005 * _GiB:  # would print as 0.00 GiB: show the bytes too
        text += f" ({x:.0f} bytes)"
    return text


def _device_summary(problem: PartitionProblem) -> str:
    """Each device's memory, consecutive equal capacities merged so 64 GPUs stay one line."""
    names, caps = problem.device_names, problem.device_memory
    if all(c == caps[0] for c in caps):
        if len(caps) == 1:
            return f"Device {names[0]} has {_gib(caps[0])}."
        return f"Each of the {len(caps)} devices has {_gib(caps[0])}."
    runs: list[tuple[int, int]] = []  # [first, last] positions with equal capacity
    for j in range(len(caps)):
        if runs and caps[runs[-1][1]] == caps[j]:
            runs[-1] = (runs[-1][0], j)
        else:
            runs.append((j, j))
    parts = [
        f"{names[a]} {_gib(caps[a])}" if a == b else f"{names[a]}..{names[b]} {_gib(caps[a])} each"
        for a, b in runs
    ]
    return "Devices have: " + ", ".join(parts) + "."


_MAX_STAGES_LISTED = 3
_MAX_BOUNDS_LISTED = 8


def _infeasible_message(problem: PartitionProblem, closest: Partition) -> str:
    """The message; `closest` is the partition with the smallest worst overshoot
    (`partition_stages._closest_partition`, passed in: it runs the DP)."""
    n, p = problem.n, problem.p
    caps = problem.device_memory
    names = problem.unit_names
    over = [
        (need - caps[j], j)
        for j, need in enumerate(closest.stage_memory)
        if need > caps[j]
    ]
    over.sort(key=lambda t: (-t[0], t[1]))
    lines = [
        f"no partition of the {n} units onto the {p} devices fits in memory (each stage needs "
        f"params + grads + optimizer state + microbatches in flight x (activations + boundary "
        f"buffers) <= its device's memory).",
        # Spell the bounds out only while they stay readable.
        "The closest partition"
        + (f" {list(closest.bounds)}" if p <= _MAX_BOUNDS_LISTED else "")
        + f" (smallest worst shortfall) still overflows on {len(over)} of {p} devices:",
    ]
    for short, j in over[:_MAX_STAGES_LISTED]:
        s, e = closest.bounds[j]
        need = closest.stage_memory[j]
        static = _segment_sum(problem.unit_static_bytes, s, e) + replica_bytes(problem.replicas, s, e)
        per_mb = (
            _segment_sum(problem.unit_activation_bytes, s, e)
            + (problem.boundary_bytes[s - 1] if s > 0 else 0.0)
            + (problem.boundary_bytes[e - 1] if e < n else 0.0)
        )
        units = names[s] if e - s == 1 else f"{names[s]}..{names[e - 1]}"
        if closest.recompute and closest.recompute[j] and closest.offload and closest.offload[j]:
            kept = (problem.boundary_bytes[s - 1] if s > 0 else 0.0) + _segment_sum(_checkpoint_bytes(problem), s, e)
            parts = (f"weights streamed from host memory, recomputed unit by unit: "
                     f"{_gib(weight_buffer(problem.unit_param_bytes, s, e))} double buffer + {problem.inflight[j]} in "
                     f"flight x {_gib(kept)} unit inputs and boundaries + "
                     f"{_gib(max(problem.unit_recompute_peak[s:e]))} activations of the unit being recomputed")
        elif closest.recompute and closest.recompute[j]:
            act = _segment_sum(problem.unit_activation_bytes, s, e)
            parts = (f"static {_gib(static)} + {problem.inflight[j]} in flight x {_gib(per_mb - act)} boundaries "
                     f"+ {_gib(act)} activations of the microbatch being recomputed")
        elif closest.offload and closest.offload[j]:
            parts = (f"weights streamed from host memory: {_gib(weight_buffer(problem.unit_param_bytes, s, e))} "
                     f"double buffer + {problem.inflight[j]} in flight x {_gib(per_mb)} activations and boundaries")
        else:
            parts = (f"static {_gib(static)} + {problem.inflight[j]} in flight x "
                     f"{_gib(per_mb)} activations and boundaries")
        lines.append(
            f"  stage {j} (units {s}-{e - 1}: {units}) on {problem.device_names[j]} needs "
            f"{_gib(need)} ({parts}) but the device has {_gib(caps[j])}: {_gib(short)} short"
        )
    if len(over) > _MAX_STAGES_LISTED:
        lines.append(
            f"  ... and {len(over) - _MAX_STAGES_LISTED} more stages over their device's memory"
        )
    lines.append(_device_summary(problem))

    # Which remedy can work depends on what overflows: static state only shrinks with more
    # (or bigger) devices; activations also shrink with recomputation or smaller microbatches.
    total_static = math.fsum(problem.unit_static_bytes)
    total_memory = math.fsum(caps)
    largest = max(caps)
    heaviest = max(range(n), key=lambda u: (problem.unit_static_bytes[u], -u))
    heaviest_static = problem.unit_static_bytes[heaviest]
    # streaming weights from host memory (offload) takes the static state off the device; worth
    # suggesting wherever a device's host memory is not its own (not on CPUs)
    can_offload = not all(problem.host_memory_is_device) if problem.host_memory_is_device else True
    offload_fix = ("; or stream weights from host memory with offload='auto' (params, grads and optimizer "
                   "state stay on the host, each unit's weights are copied in while the previous unit computes, "
                   "at the cost of host-link time)" if problem.offload == "off" and can_offload else "")
    if problem.offload != "off" and any(closest.offload):
        held = weight_buffer(problem.unit_param_bytes, 0, n)  # the largest double buffer of any stage
        fix = (
            f"even with weights streamed from host memory a device holds two consecutive units' weights (and in "
            f"training their weight gradients; up to {_gib(held)}) plus its activations and boundary buffers: use "
            + ("activation recomputation (recompute='auto'), " if problem.recompute == "off" else "")
            + "finer units (split the largest blocks), more microbatches (fewer bytes per microbatch), more "
            "devices, or devices with more memory"
        )
    elif heaviest_static > largest:
        fix = (
            f"unit {names[heaviest]!r} alone holds {_gib(heaviest_static)} of params, grads and "
            f"optimizer state, more than the largest device ({_gib(largest)}), so more devices "
            f"cannot help: use devices with more memory, finer units (split that block), or a "
            f"lighter optimizer / lower precision"
        )
    elif total_static > total_memory:
        fix = (
            f"params, grads and optimizer state alone total {_gib(total_static)} but the {p} "
            f"devices hold {_gib(total_memory)} together: use more devices (at least "
            f"{math.ceil(total_static / largest)} of {_gib(largest)}) or devices with more "
            f"memory; recomputation and more microbatches do not shrink this part"
        )
    else:
        fix = (
            f"params, grads and optimizer state total {_gib(total_static)} of the "
            f"{_gib(total_memory)} all devices hold, so activations and boundary buffers "
            f"overflow: use "
            + ("activation recomputation (recompute=True or 'auto'), " if problem.recompute == "off" else "")
            + "more microbatches (fewer bytes per "
            "microbatch), a schedule with fewer microbatches in flight (1F1B instead of "
            "GPipe), more devices, or devices with more memory"
        )
    lines.append("To make it fit: " + fix + offload_fix + ".")
    return "\n".join(lines)
