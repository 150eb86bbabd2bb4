"""Devices, links and clusters: what the planner plans for.

A `Cluster` is an ordered tuple of `Device`s and the `Link`s between them. Planning never
needs the devices to exist: speeds and memory are numbers, taken from a calibration (CPU),
from torch's device properties (CUDA) or from a JSON file.

This module holds the types and the cluster file format; around it: `gpu_presets` (spec
numbers of common GPUs), `device_strings` ("cpu", "cuda:0", "h100" -> devices, used by
`Cluster.from_devices`), `local_machine` (CPU calibration, RAM) and `json_files`
(`read_json_file`, shared with plan files). `GiB`, `CUDA_PRESETS`, `NODE_LINK_PRESETS`,
`cpu_calibration` and `read_json_file` are still importable from here.

Example:
    >>> c = Cluster.from_devices(["cpu", "cpu"])
    >>> c.link(0, 1).bandwidth > 0
    True
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from fxpipe.compiler.gpu_presets import CUDA_PRESETS, GiB, NODE_LINK_PRESETS
from fxpipe.compiler.json_files import read_json_file
from fxpipe.compiler.local_machine import cpu_calibration
from fxpipe.errors import PlanError

__all__ = ["Device", "Link", "NodeLink", "Cluster", "cpu_calibration", "CUDA_PRESETS", "NODE_LINK_PRESETS",
           "DEFAULT_HOST_BANDWIDTH", "host_groups", "GiB"]

# host_bandwidth of a device that does not give one: a CUDA (or meta, planning-only) device
# is priced as a PCIe gen4 x16 link; a CPU's "host" is its own memory, so a copy at its
# memory bandwidth (offloading there frees nothing; the planner never chooses it on its own).
DEFAULT_HOST_BANDWIDTH = 25e9


@dataclass(frozen=True, slots=True)
class Device:
    """One device a stage can run on.

    Attributes:
        name: torch device string ("cpu", "cuda:0") or a free label for planning only.
        kind: "cpu", "cuda" or "meta" (planning only).
        peak_flops: sustained FLOP/s for dense math.
        mem_bandwidth: sustained bytes/s for memory-bound ops.
        memory: usable bytes for this device's stages.
        launch_overhead: seconds per op dispatched (Python + kernel launch).
        threads: CPU intra-op threads this device's worker may use (CPU only).
        node: the machine (node) the device sits in, or -1 for unknown. Devices with a known
            node are linked by the cluster's node links (see `NodeLink`), so a 64-GPU cluster
            needs no 64 x 64 list of links.
        host_bandwidth: bytes/s between pinned host memory and this device, each direction
            (full duplex): what streaming offloaded weights costs. None (the default) means
            `DEFAULT_HOST_BANDWIDTH` for CUDA and meta devices and `mem_bandwidth` for CPUs.
        host_memory: bytes of host memory (RAM) of the device's node that offloaded stages may
            use for their pinned weights, grads and optimizer state; shared by every device of
            that node (`host_groups`: devices of unknown node count as one machine). None (the
            default): unknown, not checked. A CPU's stages are in its own memory (`memory`),
            so this is only informative there.
    """

    name: str
    kind: str
    peak_flops: float
    mem_bandwidth: float
    memory: float
    launch_overhead: float = 5e-6
    threads: int = 1
    node: int = -1
    host_bandwidth: float | None = None
    host_memory: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlanError(f"device name must be a non-empty string such as 'cpu' or 'gpu0', got {self.name!r}")
        if self.kind not in ("cpu", "cuda", "meta"):
            raise PlanError(f"device {self.name!r}: kind must be 'cpu', 'cuda' or 'meta', got {self.kind!r}")
        units = {"peak_flops": "FLOP/s", "mem_bandwidth": "bytes/s", "memory": "bytes"}
        for f, unit in units.items():
            v = getattr(self, f)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise PlanError(f"device {self.name!r}: {f} must be a positive number of {unit}, got {v!r}")
        if not _is_number(self.launch_overhead) or not math.isfinite(self.launch_overhead) or self.launch_overhead < 0:
            raise PlanError(f"device {self.name!r}: launch_overhead must be a number of seconds >= 0, "
                            f"got {self.launch_overhead!r}")
        if not _is_int(self.threads) or self.threads < 1:
            raise PlanError(f"device {self.name!r}: threads must be an integer >= 1, got {self.threads!r}")
        if not _is_int(self.node) or self.node < -1:
            raise PlanError(f"device {self.name!r}: node must be an integer >= 0 (or -1 for unknown), got {self.node!r}")
        if self.host_bandwidth is None:  # frozen: resolved once here, so every reader sees a number
            object.__setattr__(self, "host_bandwidth", _default_host_bandwidth(self.kind, self.mem_bandwidth))
        elif not _is_number(self.host_bandwidth) or not math.isfinite(self.host_bandwidth) or self.host_bandwidth <= 0:
            raise PlanError(f"device {self.name!r}: host_bandwidth must be a positive number of bytes/s "
                            f"(pinned host <-> device copies), or left out for the default; got {self.host_bandwidth!r}")
        if self.host_memory is not None and (not _is_number(self.host_memory) or not math.isfinite(self.host_memory)
                                             or self.host_memory <= 0):
            raise PlanError(f"device {self.name!r}: host_memory must be a positive number of bytes (the RAM of its "
                            f"node that offloaded stages may use), or left out when unknown; got {self.host_memory!r}")


def host_groups(devices: Sequence[Device]) -> dict[int, tuple[list[int], float]]:
    """Devices sharing one host's memory, by node (-1: every device of unknown node, taken as
    one machine, which is never optimistic): node -> (device indices, host bytes: the
    smallest `host_memory` given among them, inf when none is). CPUs are left out: what they
    offload stays in their own memory, which `memory` already bounds."""
    out: dict[int, tuple[list[int], float]] = {}
    for i, d in enumerate(devices):
        if d.kind == "cpu":
            continue
        idx, cap = out.get(d.node, ([], math.inf))
        idx.append(i)
        out[d.node] = (idx, min(cap, d.host_memory) if d.host_memory is not None else cap)
    return out


def _default_host_bandwidth(kind: str, mem_bandwidth: float) -> float:
    return float(mem_bandwidth) if kind == "cpu" else DEFAULT_HOST_BANDWIDTH


def _is_number(v: Any) -> bool:
    # bool is an int subclass, but `memory: true` in a file is a mistake, not 1 byte
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class Link:
    """A directed connection between two devices of a cluster (by index)."""

    src: int
    dst: int
    bandwidth: float  # bytes/s
    latency: float = 0.0  # seconds per message

    def __post_init__(self) -> None:
        for f in ("src", "dst"):
            v = getattr(self, f)
            if not _is_int(v) or v < 0:
                raise PlanError(f"link {self.src!r}->{self.dst!r}: {f} must be a device index (an integer >= 0), got {v!r}")
        if not (_is_number(self.bandwidth) and math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise PlanError(f"link {self.src}->{self.dst}: bandwidth must be a positive number of bytes/s, got {self.bandwidth!r}")
        if not (_is_number(self.latency) and math.isfinite(self.latency) and self.latency >= 0):
            raise PlanError(f"link {self.src}->{self.dst}: latency must be a number of seconds >= 0, got {self.latency!r}")

    def transfer_time(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency + nbytes / self.bandwidth


@dataclass(frozen=True, slots=True)
class NodeLink:
    """The link between devices of two nodes (or within one node), by node number.

    ``NodeLink(a, a, ...)`` prices every pair of devices inside node a; ``NodeLink(a, b, ...)``
    with a != b every pair with one device in node a and one in node b (both directions);
    ``NodeLink(-1, -1, ...)`` every pair of devices in two different nodes not listed otherwise.
    """

    src_node: int
    dst_node: int
    bandwidth: float  # bytes/s
    latency: float = 0.0  # seconds per message

    def __post_init__(self) -> None:
        what = f"node link {self.src_node!r}-{self.dst_node!r}"
        for f in ("src_node", "dst_node"):
            v = getattr(self, f)
            if not _is_int(v) or v < -1:
                raise PlanError(f"{what}: {f} must be a node number >= 0 (or -1 for any), got {v!r}")
        if (self.src_node == -1) != (self.dst_node == -1):
            raise PlanError(f"{what}: -1 (any node) must be used for both ends: (-1, -1) is the default "
                            "between two different nodes")
        if not (_is_number(self.bandwidth) and math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise PlanError(f"{what}: bandwidth must be a positive number of bytes/s, got {self.bandwidth!r}")
        if not (_is_number(self.latency) and math.isfinite(self.latency) and self.latency >= 0):
            raise PlanError(f"{what}: latency must be a number of seconds >= 0, got {self.latency!r}")

    @property
    def key(self) -> tuple[int, int]:
        return (min(self.src_node, self.dst_node), max(self.src_node, self.dst_node))


@dataclass(frozen=True)
class Cluster:
    """Devices in pipeline order plus the links between them.

    The link between devices i and j is, in this order: the `Link` listed for the pair; when
    both devices have a known node, the `NodeLink` for their two nodes (or, for two different
    nodes, the ``(-1, -1)`` default node link); else a default by device kind (same-kind CPU
    devices share memory, so their default link is a memory copy).
    """

    devices: tuple[Device, ...]
    links: tuple[Link, ...] = ()
    node_links: tuple[NodeLink, ...] = ()
    _index: dict = field(default_factory=dict, compare=False, repr=False)
    _node_index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in ("devices", "links", "node_links"):  # lists are convenient to write; store tuples (frozen, hashable)
            if isinstance(getattr(self, f), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))
        if not isinstance(self.devices, tuple) or not self.devices:
            raise PlanError("a cluster needs a non-empty tuple of fxpipe.Device values; got "
                            f"{self.devices!r} (use Cluster.from_devices(['cpu', 'cpu']) for device strings)")
        for k, d in enumerate(self.devices):
            if not isinstance(d, Device):
                raise PlanError(f"cluster device {k} is {d!r}, not a fxpipe.Device; "
                                "use Cluster.from_devices([...]) to build one from device strings")
        if not isinstance(self.links, tuple) or not all(isinstance(l, Link) for l in self.links):
            raise PlanError(f"cluster links must be a tuple of fxpipe.Link values, got {self.links!r}")
        n = len(self.devices)
        for l in self.links:
            if not (0 <= l.src < n and 0 <= l.dst < n) or l.src == l.dst:
                raise PlanError(f"link {l.src}->{l.dst} names a device outside 0..{n - 1} or itself")
            if (l.src, l.dst) in self._index or (l.dst, l.src) in self._index:
                raise PlanError(f"link {l.src}->{l.dst} is given twice (a link serves both directions); keep one")
            self._index[(l.src, l.dst)] = l
        if not isinstance(self.node_links, tuple) or not all(isinstance(l, NodeLink) for l in self.node_links):
            raise PlanError(f"cluster node_links must be a tuple of fxpipe.NodeLink values, got {self.node_links!r}")
        for l in self.node_links:
            if l.key in self._node_index:
                raise PlanError(f"node link {l.src_node}-{l.dst_node} is given twice (a link serves both directions); "
                                "keep one")
            self._node_index[l.key] = l

    def __len__(self) -> int:
        return len(self.devices)

    def link(self, i: int, j: int) -> Link:
        """The link from device i to device j (a default one when not listed)."""
        if (i, j) in self._index:
            return self._index[(i, j)]
        if (j, i) in self._index:
            l = self._index[(j, i)]
            return Link(i, j, l.bandwidth, l.latency)
        a, b = self.devices[i].node, self.devices[j].node
        if a >= 0 and b >= 0 and self._node_index:
            nl = self._node_index.get((min(a, b), max(a, b)))
            if nl is None and a != b:
                nl = self._node_index.get((-1, -1))
            if nl is not None:
                return Link(i, j, nl.bandwidth, nl.latency)
        return _default_link(self.devices[i], self.devices[j], i, j)

    def subset(self, order: Sequence[int]) -> "Cluster":
        """A cluster of the given devices in the given order, links re-indexed (node links kept)."""
        pos = {d: k for k, d in enumerate(order)}
        links = tuple(
            Link(pos[l.src], pos[l.dst], l.bandwidth, l.latency)
            for l in self.links
            if l.src in pos and l.dst in pos
        )
        return Cluster(tuple(self.devices[d] for d in order), links, self.node_links)

    def nodes(self) -> tuple[int, ...]:
        """The distinct known node numbers, ascending."""
        return tuple(sorted({d.node for d in self.devices if d.node >= 0}))

    @staticmethod
    def preset(name: str, count: int, per_node: int = 8, *, inter_node_bandwidth: float = 25e9,
               inter_node_latency: float = 2e-5, intra_node_bandwidth: float | None = None,
               intra_node_latency: float | None = None, memory: float | None = None,
               first_node: int = 0, host_memory: float | None = None) -> "Cluster":
        """`count` GPUs of a known kind (h100, h200, a100, l4), `per_node` to a node.

        Speeds, memory and each node's host memory (`host_memory` overrides it, bytes per
        node) come from `CUDA_PRESETS`, the link inside a node from
        `NODE_LINK_PRESETS` (NVLink-class for H100/H200/A100, PCIe-class for L4); nodes are
        joined by a slower network (default 25e9 B/s = 200 Gb/s, 2e-5 s). The GPUs need not
        exist here: the result is for planning offline.

        Example:
            >>> c = Cluster.preset("h100", 16, per_node=8)
            >>> c.link(0, 1).bandwidth, c.link(7, 8).bandwidth
            (450000000000.0, 25000000000.0)
        """
        key = name.lower() if isinstance(name, str) else name
        if key not in CUDA_PRESETS:
            raise PlanError(f"unknown GPU preset {name!r}: use one of {', '.join(map(repr, CUDA_PRESETS))}, "
                            "or build fxpipe.Device values (or a cluster file) for other hardware")
        if not _is_int(count) or count < 1:
            raise PlanError(f"preset {name!r}: count must be a positive integer, got {count!r}")
        if not _is_int(per_node) or per_node < 1:
            raise PlanError(f"preset {name!r}: per_node must be a positive integer, got {per_node!r}")
        if not _is_int(first_node) or first_node < 0:
            raise PlanError(f"preset {name!r}: first_node must be an integer >= 0, got {first_node!r}")
        spec = CUDA_PRESETS[key]
        bw, lat = NODE_LINK_PRESETS[key]
        bw = bw if intra_node_bandwidth is None else intra_node_bandwidth
        lat = lat if intra_node_latency is None else intra_node_latency
        mem = spec["memory"] if memory is None else memory
        host = spec["host_memory"] if host_memory is None else host_memory
        devices = tuple(
            Device(f"{key}:{k}", "cuda", spec["peak_flops"], spec["mem_bandwidth"], mem, 8e-6, 1,
                   node=first_node + k // per_node, host_bandwidth=spec["host_bandwidth"], host_memory=host)
            for k in range(count))
        n_nodes = (count + per_node - 1) // per_node
        node_links = tuple(NodeLink(first_node + k, first_node + k, bw, lat) for k in range(n_nodes))
        if n_nodes > 1:
            node_links += (NodeLink(-1, -1, inter_node_bandwidth, inter_node_latency),)
        return Cluster(devices, (), node_links)

    @staticmethod
    def concat(a: "Cluster", b: "Cluster", *, link: Link | NodeLink | tuple[float, float] | None = None) -> "Cluster":
        """Devices of `a` then of `b`; `link` (bandwidth, latency) joins every node of a to every node of b.

        b's nodes are renumbered after a's, each side keeps its own links, and a side's default
        inter-node link ``(-1, -1)`` is spelled out for its own node pairs. Devices of unknown
        node are joined by `link` too (as explicit device links).

        Example:
            >>> mixed = Cluster.concat(Cluster.preset("h100", 8), Cluster.preset("a100", 8), link=(25e9, 2e-5))
            >>> mixed.link(0, 1).bandwidth, mixed.link(8, 9).bandwidth, mixed.link(7, 8).bandwidth
            (450000000000.0, 300000000000.0, 25000000000.0)
        """
        if not isinstance(a, Cluster) or not isinstance(b, Cluster):
            raise PlanError(f"Cluster.concat needs two Cluster values, got {type(a).__name__} and {type(b).__name__}")
        if link is None:
            bw, lat = 25e9, 2e-5
        elif isinstance(link, (Link, NodeLink)):
            bw, lat = link.bandwidth, link.latency
        elif isinstance(link, (tuple, list)) and len(link) == 2:
            bw, lat = link
        else:
            raise PlanError(f"Cluster.concat: link must be (bandwidth, latency), a Link or a NodeLink, got {link!r}")
        NodeLink(0, 1, bw, lat)  # validates the numbers
        shift = (max(a.nodes()) + 1) if a.nodes() else 0

        def spelled(c: Cluster, offset: int) -> list[NodeLink]:
            out = [NodeLink(l.src_node + offset, l.dst_node + offset, l.bandwidth, l.latency)
                   for l in c.node_links if l.src_node >= 0]
            default = c._node_index.get((-1, -1))
            if default is not None:
                ns = c.nodes()
                have = {l.key for l in c.node_links}
                out += [NodeLink(x + offset, y + offset, default.bandwidth, default.latency)
                        for i, x in enumerate(ns) for y in ns[i + 1:] if (x, y) not in have]
            return out

        devices = a.devices + tuple(d if d.node < 0 else _with_node(d, d.node + shift) for d in b.devices)
        node_links = spelled(a, 0) + spelled(b, shift)
        node_links += [NodeLink(x, y + shift, bw, lat) for x in a.nodes() for y in b.nodes()]
        na = len(a.devices)
        links = list(a.links) + [Link(l.src + na, l.dst + na, l.bandwidth, l.latency) for l in b.links]
        listed = {(l.src, l.dst) for l in links} | {(l.dst, l.src) for l in links}
        for i, da in enumerate(a.devices):
            for j, db in enumerate(b.devices):
                if (da.node < 0 or db.node < 0) and (i, na + j) not in listed:
                    links.append(Link(i, na + j, bw, lat))
        return Cluster(devices, tuple(links), tuple(node_links))

    # ---- construction -------------------------------------------------------------------
    @staticmethod
    def from_devices(devices: Sequence[str | Device], *, memory: float | None = None) -> "Cluster":
        """Build a cluster from torch device strings (or Device values).

        Several "cpu" entries are distinct workers sharing the machine's cores and memory:
        each gets cores // n intra-op threads and memory / n.

        Example:
            >>> Cluster.from_devices(["cpu"] * 3).devices[2].name
            'cpu'
        """
        if isinstance(devices, (str, Device)):
            devices = [devices]
        if not isinstance(devices, (list, tuple)):
            raise PlanError(f"devices must be a list of device strings or fxpipe.Device values (e.g. ['cpu', 'cpu']) "
                            f"or a Cluster, got {type(devices).__name__} {devices!r}")
        devices = list(devices)
        if not devices:
            raise PlanError("devices is empty: pass at least one device, e.g. devices=['cpu', 'cpu']")
        if memory is not None and (not _is_number(memory) or not math.isfinite(memory) or memory <= 0):
            raise PlanError(f"memory must be a positive number of bytes per device, got {memory!r}")
        # device_strings builds Devices and Clusters, so it imports this module: imported here
        from fxpipe.compiler.device_strings import device_from_string, device_kind, preset_cluster

        if any(isinstance(d, str) and d.split(":")[0].lower() in CUDA_PRESETS for d in devices):
            return preset_cluster(devices, memory)
        n_cpu = sum(1 for d in devices if isinstance(d, str) and device_kind(d) == "cpu")
        out: list[Device] = []
        for d in devices:
            if isinstance(d, Device):
                out.append(d)
            elif isinstance(d, str):
                out.append(device_from_string(d, n_cpu, memory))
            else:
                raise PlanError(f"device {d!r} is neither a string like 'cpu'/'cuda:0' nor a fxpipe.Device")
        return Cluster(tuple(out))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "devices": [_device_dict(d) for d in self.devices],
            "links": [asdict(l) for l in self.links],
        }
        if self.node_links:  # written only when used, so files stay readable by older fxpipe
            out["node_links"] = [asdict(l) for l in self.node_links]
        return out

    @staticmethod
    def from_dict(data: Any, where: str = "cluster") -> "Cluster":
        """Validate and build a cluster from its JSON form; PlanError names the bad field."""
        example = ('{"devices": [{"name": "gpu0", "kind": "cuda", "peak_flops": 6.7e13, "mem_bandwidth": 3.35e12, '
                   '"memory": 8.5e10}], "links": [{"src": 0, "dst": 1, "bandwidth": 4.5e11, "latency": 1e-5}]}')
        if isinstance(data, dict) and data.get("format") == "fxpipe-plan":  # `--cluster plan.json`
            raise PlanError(f"{where} is a plan file, not a cluster file; pass it to `fxpipe inspect` or "
                            "compile(plan=...), or give --devices / a cluster file")
        if not isinstance(data, dict) or "devices" not in data:
            # a dict without 'devices' was reported as "got dict", which reads as the right type
            got = (f"an object with fields {sorted(map(str, data))[:8]}" if isinstance(data, dict)
                   else type(data).__name__)
            raise PlanError(f"{where}: expected an object with a 'devices' list (and optional 'links'), "
                            f"got {got}; e.g. {example}")
        extra = sorted(str(k) for k in data if k not in ("devices", "links", "node_links"))
        if extra:
            raise PlanError(f"{where}: unknown field(s) {extra}; a cluster has only 'devices', 'links' "
                            "and 'node_links'")
        if not isinstance(data["devices"], list) or not data["devices"]:
            raise PlanError(f"{where}: 'devices' must be a non-empty list of device objects, got {data['devices']!r}")
        devs = []
        required = ("name", "kind", "peak_flops", "mem_bandwidth", "memory")
        for k, d in enumerate(data["devices"]):
            if not isinstance(d, dict):
                raise PlanError(f"{where}: devices[{k}] must be an object like {{\"name\": \"gpu0\", ...}}, got {d!r}")
            missing = [f for f in required if f not in d]
            if missing:
                raise PlanError(f"{where}: devices[{k}] is missing {', '.join(missing)} (required: {', '.join(required)})")
            extra = sorted(str(f) for f in d if f not in Device.__dataclass_fields__)
            if extra:
                raise PlanError(f"{where}: devices[{k}] has unknown field(s) {extra} "
                                f"(allowed: {', '.join(Device.__dataclass_fields__)})")
            try:
                devs.append(Device(**d))
            except PlanError as e:
                raise PlanError(f"{where}: devices[{k}]: {e}") from None
        links = _parse_entries(data.get("links", []), where, "links", ("src", "dst", "bandwidth"), ("latency",),
                               lambda l: Link(l["src"], l["dst"], l["bandwidth"], l.get("latency", 0.0)))
        node_links = _parse_entries(data.get("node_links", []), where, "node_links",
                                    ("src_node", "dst_node", "bandwidth"), ("latency",),
                                    lambda l: NodeLink(l["src_node"], l["dst_node"], l["bandwidth"],
                                                       l.get("latency", 0.0)))
        try:
            return Cluster(tuple(devs), tuple(links), tuple(node_links))
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None

    @staticmethod
    def load(path: str | os.PathLike) -> "Cluster":
        """Read a cluster file (see `from_dict` for the format); PlanError names what is wrong."""
        data = read_json_file(path, "cluster file")
        return Cluster.from_dict(data, where=f"cluster file {path}")


def _device_dict(d: Device) -> dict[str, Any]:
    out = asdict(d)
    if d.node < 0:  # unknown node: leave the field out, as files written before it existed
        del out["node"]
    if d.host_bandwidth == _default_host_bandwidth(d.kind, d.mem_bandwidth):  # likewise (and it loads back the same)
        del out["host_bandwidth"]
    if d.host_memory is None:  # unknown: left out, as files written before it existed
        del out["host_memory"]
    return out


def _with_node(d: Device, node: int) -> Device:
    from dataclasses import replace

    return replace(d, node=node)


def _parse_entries(raw: Any, where: str, name: str, required: tuple[str, ...], optional: tuple[str, ...],
                   build: Any) -> list:
    """Validate a JSON list of link-like objects and build each; PlanError names the entry."""
    if not isinstance(raw, list):
        raise PlanError(f"{where}: '{name}' must be a list of objects, got {type(raw).__name__}")
    example = ", ".join(f'"{f}": ...' for f in required)
    out = []
    for k, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise PlanError(f"{where}: {name}[{k}] must be an object like {{{example}}}, got {entry!r}")
        missing = [f for f in required if f not in entry]
        if missing:
            raise PlanError(f"{where}: {name}[{k}] is missing {', '.join(missing)} (required: {', '.join(required)})")
        extra = sorted(str(f) for f in entry if f not in required + optional)
        if extra:
            raise PlanError(f"{where}: {name}[{k}] has unknown field(s) {extra} "
                            f"(allowed: {', '.join(required + optional)})")
        try:
            out.append(build(entry))
        except PlanError as e:
            raise PlanError(f"{where}: {name}[{k}]: {e}") from None
    return out


def _default_link(a: Device, b: Device, i: int, j: int) -> Link:
    if a.kind == "cpu" and b.kind == "cpu":
        # Same process, same memory: a "transfer" hands over a reference; price a copy anyway
        # so the planner still prefers small boundaries.
        return Link(i, j, min(a.mem_bandwidth, b.mem_bandwidth) * 4, 2e-6)
    if a.kind == "cuda" and b.kind == "cuda":
        return Link(i, j, 50e9, 10e-6)  # conservative PCIe/NVLink-agnostic default
    return Link(i, j, 12e9, 15e-6)  # host <-> device over PCIe
