"""GPU presets: speeds, memory and links of common GPUs, for planning without them.

`Cluster.preset("h100", 16)` and device lists such as `["h100"] * 8` (`device_strings`) build
clusters from these numbers; a real CUDA device takes the preset its name matches. Kept apart
from the `Device`/`Cluster` types: spec-sheet data, revised without touching them.
"""

from __future__ import annotations

__all__ = ["GiB", "CUDA_PRESETS", "NODE_LINK_PRESETS"]

GiB = 1024**3

# Dense fp32 peak and memory bandwidth of common GPUs (spec sheets, non-tensor-core fp32
# would be far lower; we take TF32 tensor-core rates since torch uses them for fp32 matmul
# only when allowed, so the fp32 column is the conservative SIMT rate).
# host_bandwidth: pinned host <-> device copies over the GPU's host link, per direction
# (PCIe gen5 x16 for H100/H200 SXM, gen4 x16 for A100 and L4), at about 80% of the link's rate.
# host_memory: the node's RAM usable for offloaded stages (pinned weights, grads, optimizer
# state), shared by the node's GPUs: 80% of a typical 8-GPU node (DGX H100/H200 2 TiB, A100
# nodes 1 TiB, 8 x L4 cloud nodes 384 GiB), the rest left to the OS, data loading and Python.
CUDA_PRESETS: dict[str, dict[str, float]] = {
    "h100": {"peak_flops": 67e12, "mem_bandwidth": 3.35e12, "memory": 80 * GiB, "host_bandwidth": 50e9,
             "host_memory": 0.8 * 2048 * GiB},
    "h200": {"peak_flops": 67e12, "mem_bandwidth": 4.8e12, "memory": 141 * GiB, "host_bandwidth": 50e9,
             "host_memory": 0.8 * 2048 * GiB},
    "a100": {"peak_flops": 19.5e12, "mem_bandwidth": 2.0e12, "memory": 80 * GiB, "host_bandwidth": 25e9,
             "host_memory": 0.8 * 1024 * GiB},
    "l4": {"peak_flops": 30e12, "mem_bandwidth": 0.3e12, "memory": 24 * GiB, "host_bandwidth": 25e9,
           "host_memory": 0.8 * 384 * GiB},
}

# Link between two GPUs of the same node (bytes/s, seconds): NVLink-class for the SXM parts,
# PCIe-class for L4. Between nodes `Cluster.preset` defaults to 25e9 B/s (200 Gb/s) and 2e-5 s.
NODE_LINK_PRESETS: dict[str, tuple[float, float]] = {
    "h100": (450e9, 5e-6),
    "h200": (450e9, 5e-6),
    "a100": (300e9, 5e-6),
    "l4": (32e9, 5e-6),
}
