"""Placement: which device runs which pipeline position, with the exact partitioner per order.

A placement is an order of the cluster's devices: position j of the pipeline (stage j) runs
on device ``order[j]``. For a given order the optimal contiguous partition is exact
(`partition_stages`); placement searches orders on top of it, and every candidate is priced
by the caller's own ``make_problem(order)``, so each device's speed and memory and each link
between consecutive positions (``boundary_time`` is per link) enter the comparison: heavy
boundaries end up on fast links because those orders win.

Search:

* **exhaustive** (at most ``exhaustive_limit`` devices, default 8): every order up to
  symmetry. Two devices are interchangeable when they are equal in everything but their name
  and node (speed, memory, kind, launch overhead, threads) and have the same link to every
  third device (then swapping them is a symmetry of the cluster and changes no cost).
  Interchangeability is an equivalence relation, so it is enough to enumerate the distinct
  orders of the equivalence *classes* (multiset permutations) and give each class's members
  in index order. 8 H100s in one node are 1 order, 4 H100 + 4 A100 in two nodes 70, 8 all
  different devices 40,320. Exact: the result's bottleneck is the optimum over all orders x
  all contiguous partitions. Beyond ``_PRUNE_FROM`` distinct orders the enumeration is a
  branch and bound (`_branch_and_bound`): orders are grown position by position, the DP
  column of a position is computed once per (position, device, next device) and shared by
  every order with that prefix, and a prefix whose lower bound cannot beat the fourth-best
  complete order is dropped. Same result, runner-ups included, as enumerating them all.
* **heuristic** (more devices): devices grouped by node (nodes in their given order), within
  a node fastest first and fastest last; each in both directions; then a first-improvement
  local search swapping whole nodes and, up to ``2 * exhaustive_limit`` devices, two devices
  of different kinds (never two of the same kind: that only changes which node boundary a
  cut crosses), within ``max_candidates`` evaluations (default 200). It reports ``lower_bound``, a valid bound on any order's
  bottleneck: ``max(max_u min_d t[u][d], sum_u min_d t[u][d] / p)`` (each unit costs at
  least its time on its fastest device; p devices share the total), so
  ``partition.bottleneck / lower_bound`` bounds how far from optimal the heuristic can be.

Ties on the bottleneck keep the earliest order enumerated: the given order first, so on a
cluster whose orders are all equivalent the placement is the identity.

Example:
    >>> from fxpipe.compiler.cluster import Cluster
    >>> c = Cluster.from_devices(["meta", "meta"])
    >>> def make(order):
    ...     return PartitionProblem(("a", "b"), ((1.0, 1.0), (1.0, 1.0)), ((0.0,),), (0.0, 0.0), (0.0, 0.0),
    ...                             (0.0,), (1, 1), (1.0, 1.0), ("x", "y"))
    >>> place_stages(make, c).order
    (0, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from fxpipe.compiler.cluster import Cluster
from fxpipe.errors import PlanError
from fxpipe.passes.partition_stages import (Partition, PartitionProblem, _stage_tables,
                                           optimal_bottleneck, partition_stages)

__all__ = ["Placement", "place_stages", "device_classes", "class_orders", "placement_lower_bound"]

_RUNNER_UPS = 3
_PRUNE_FROM = 50  # distinct orders above which the exhaustive search prunes (see _branch_and_bound)
_TABLE_BUDGET = 512 * 2**20  # bytes of cached DP columns the branch and bound may hold


@dataclass(frozen=True)
class Placement:
    """The chosen device order and its optimal partition.

    Attributes:
        order: device index (into the cluster) per pipeline position.
        partition: the exact optimal partition for that order.
        problem: the `PartitionProblem` of that order (what ``make_problem(order)`` returned).
        method: "exhaustive" (optimal over all orders) or "heuristic".
        candidates: orders evaluated (each with the exact partitioner).
        runner_ups: up to 3 other evaluated orders with their optimal bottleneck (seconds),
            best first; orders that do not fit in memory are left out.
        lower_bound: a valid lower bound on the bottleneck of any order (seconds), reported
            for the heuristic (None for the exhaustive search, which is exact).
    """

    order: tuple[int, ...]
    partition: Partition
    problem: PartitionProblem
    method: str
    candidates: int
    runner_ups: tuple[tuple[tuple[int, ...], float], ...]
    lower_bound: float | None = None

    def to_dict(self) -> dict:
        """JSON form for ``plan.predicted["placement"]`` (what `explain` shows)."""
        return {"order": list(self.order), "method": self.method, "candidates": self.candidates,
                "bottleneck_ms": self.partition.bottleneck * 1e3,  # the order's min; the plan's cut may trade it for step
                "runner_ups": [{"order": list(o), "bottleneck_ms": b * 1e3} for o, b in self.runner_ups],
                "lower_bound_ms": None if self.lower_bound is None else self.lower_bound * 1e3}

    def summary(self) -> str:
        lines = [f"placement ({self.method}, {self.candidates} orders evaluated): order {list(self.order)}, "
                 f"bottleneck {self.partition.bottleneck * 1e3:.4f} ms"]
        if self.lower_bound is not None:
            ratio = self.partition.bottleneck / self.lower_bound if self.lower_bound > 0 else math.inf
            lines.append(f"  lower bound {self.lower_bound * 1e3:.4f} ms (within {ratio:.3f}x of it)")
        for order, b in self.runner_ups:
            lines.append(f"  runner-up {list(order)}: {b * 1e3:.4f} ms")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Symmetry: interchangeable devices
# --------------------------------------------------------------------------------------


def _device_key(cluster: Cluster, i: int) -> tuple:
    d = cluster.devices[i]
    return (d.kind, d.peak_flops, d.mem_bandwidth, d.memory, d.launch_overhead, d.threads, d.host_bandwidth)


def device_classes(cluster: Cluster) -> tuple[int, ...]:
    """Class label per device: equal labels = interchangeable devices (see module doc).

    Labels are numbered by first appearance, so label order follows device order.
    """
    p = len(cluster)
    links = [[(0.0, 0.0) if i == j else (cluster.link(i, j).bandwidth, cluster.link(i, j).latency)
              for j in range(p)] for i in range(p)]
    keys = [_device_key(cluster, i) for i in range(p)]
    label = [-1] * p
    reps: list[int] = []
    for i in range(p):
        for c, r in enumerate(reps):
            if keys[i] == keys[r] and all(links[i][k] == links[r][k] for k in range(p) if k != i and k != r):
                label[i] = c
                break
        else:
            label[i] = len(reps)
            reps.append(i)
    return tuple(label)


def class_orders(labels: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every distinct order of the devices up to swapping interchangeable ones.

    Multiset permutations of the labels in lexicographic order (the sorted one, i.e. the
    given device order when labels follow it, first); each class's members are placed in
    index order.
    """
    members: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        members.setdefault(c, []).append(i)
    seq = sorted(labels)
    n = len(seq)
    while True:
        used = {c: 0 for c in members}
        order = []
        for c in seq:
            order.append(members[c][used[c]])
            used[c] += 1
        yield tuple(order)
        # next lexicographic permutation of the multiset
        k = n - 2
        while k >= 0 and seq[k] >= seq[k + 1]:
            k -= 1
        if k < 0:
            return
        m = n - 1
        while seq[m] <= seq[k]:
            m -= 1
        seq[k], seq[m] = seq[m], seq[k]
        seq[k + 1:] = reversed(seq[k + 1:])


def _count_orders(labels: Sequence[int]) -> int:
    counts: dict[int, int] = {}
    for c in labels:
        counts[c] = counts.get(c, 0) + 1
    total = math.factorial(len(labels))
    for k in counts.values():
        total //= math.factorial(k)
    return total


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def _bottleneck(problem: PartitionProblem) -> float:
    """The optimal bottleneck of one order (pass 1 of `partition_stages`); inf if nothing fits."""
    if problem.n < problem.p:
        raise PlanError(f"the model has {problem.n} units but {problem.p} devices were given; "
                        f"use at most {problem.n} devices, or finer units")
    return optimal_bottleneck(problem)  # bounded DP: skips stages that cannot be within the optimum


def placement_lower_bound(problem: PartitionProblem) -> float:
    """A lower bound on the bottleneck of every order of the same devices.

    ``max(max_u min_d t[u][d], sum_u min_d t[u][d] / p)``: boundary transfers and memory only
    add to it. Valid for any order since it only uses the set of unit-time columns.
    """
    t = np.asarray(problem.unit_time, dtype=np.float64).reshape(problem.n, problem.p)
    fastest = t.min(axis=1)
    return float(max(fastest.max(), fastest.sum() / problem.p))


class _Search:
    def __init__(self, make_problem: Callable[[tuple[int, ...]], PartitionProblem], p: int):
        self.make_problem = make_problem
        self.p = p
        self.seen: dict[tuple[int, ...], float] = {}
        self.problems: dict[tuple[int, ...], PartitionProblem] = {}
        self.first_problem: PartitionProblem | None = None
        self.make_calls = 0  # make_problem calls made outside __call__ (branch and bound)
        self.visited = 0  # complete orders the branch and bound priced from cached columns

    def __call__(self, order: tuple[int, ...]) -> float:
        if order in self.seen:
            return self.seen[order]
        problem = self.make_problem(order)
        if not isinstance(problem, PartitionProblem):
            raise PlanError(f"make_problem({order}) returned {type(problem).__name__}, not a PartitionProblem")
        if self.first_problem is not None and problem.p != self.first_problem.p:
            raise PlanError(f"make_problem({order}) returned {problem.p} positions, an earlier order "
                            f"{self.first_problem.p}: every order must give the same number of stages")
        if self.first_problem is None:
            self.first_problem = problem
        b = _bottleneck(problem)
        self.seen[order] = b
        if math.isfinite(b):
            self.problems[order] = problem
            # keep only the few best problems alive (memory on big searches)
            if len(self.problems) > 4 * _RUNNER_UPS:
                keep = sorted(self.problems, key=lambda o: self.seen[o])[: 2 * _RUNNER_UPS]
                self.problems = {o: self.problems[o] for o in keep}
        return b

    def best(self) -> list[tuple[tuple[int, ...], float]]:
        """Evaluated orders that fit, best first (ties: evaluation order)."""
        rank = {o: k for k, o in enumerate(self.seen)}
        return sorted(((o, b) for o, b in self.seen.items() if math.isfinite(b)), key=lambda t: (t[1], rank[t[0]]))


def place_stages(
    make_problem: Callable[[tuple[int, ...]], PartitionProblem],
    cluster: Cluster,
    *,
    exhaustive_limit: int = 8,
    max_candidates: int = 200,
) -> Placement:
    """Choose the device order and the partition with the smallest bottleneck.

    Args:
        make_problem: order -> the `PartitionProblem` with position j on device ``order[j]``,
            e.g. ``lambda order: _problem(costs, cluster.subset(order), ...)``.
        cluster: the devices (and links) to place on; every device gets one position.
        exhaustive_limit: up to this many devices every order (up to symmetry) is tried.
        max_candidates: evaluation budget of the heuristic's local search.

    Returns:
        The `Placement`; ``placement.partition`` is ``partition_stages(placement.problem)``.

    Raises:
        PlanError: if no order has a partition that fits in memory (the message is the
            partitioner's for the given order: what overflows and what would make it fit),
            or there are fewer units than devices.
    """
    if not isinstance(cluster, Cluster):
        raise PlanError(f"place_stages needs a fxpipe.Cluster, got {type(cluster).__name__}")
    p = len(cluster)
    search = _Search(make_problem, p)
    labels = device_classes(cluster)
    lower: float | None = None
    if p <= exhaustive_limit:
        method = "exhaustive"
        if _count_orders(labels) <= _PRUNE_FROM or not _branch_and_bound(search, cluster, labels):
            for order in class_orders(labels):
                search(order)
    else:
        method = "heuristic"
        _heuristic(search, cluster, labels, max_candidates, device_swaps=p <= 2 * exhaustive_limit)
    ranked = search.best()
    if not ranked:
        identity = tuple(range(p))
        partition_stages(search.problems.get(identity) or make_problem(identity))  # raises the partitioner's message
        raise AssertionError("place_stages: no order fits but the partitioner found one")  # pragma: no cover
    order, best = ranked[0]
    problem = search.problems[order]
    part = partition_stages(problem, bottleneck=best)  # pass 1 already ran for this order
    if method == "heuristic" and search.first_problem is not None:
        lower = placement_lower_bound(search.first_problem)
    return Placement(order=order, partition=part, problem=problem, method=method, candidates=max(len(search.seen), search.visited),
                     runner_ups=tuple(ranked[1:1 + _RUNNER_UPS]), lower_bound=lower)


# --------------------------------------------------------------------------------------
# Branch and bound for exhaustive searches with many distinct orders
# --------------------------------------------------------------------------------------


class _ColumnTables:
    """Stage tables of one position, keyed by (position, device there, device after it).

    For placements with one position per device, position j's stage costs depend only on
    the device at j (its speed, memory, recompute time) and on the one at j+1 (the link the
    outgoing boundary crosses). One ``make_problem(order)`` call therefore yields the tables
    of p keys; any order's DP is assembled from cached keys. `_branch_and_bound` checks the
    assumption on the orders it returns and falls back to plain enumeration if it fails.
    """

    def __init__(self, search: _Search):
        self.search = search
        self.cache: dict[tuple[int, int, int], np.ndarray] = {}

    def fill(self, order: tuple[int, ...]) -> None:
        problem = self.search.make_problem(order)
        self.search.make_calls += 1
        n, p = problem.n, problem.p
        caps = np.asarray(problem.device_memory, dtype=np.float64)
        cols = np.full((p, n + 1, n + 1), np.inf)
        for end, time, memory in _stage_tables(problem):
            cols[:, :end, end] = np.where(memory <= caps[None, :], time, np.inf).T
        for j in range(p):
            self.cache.setdefault((j, order[j], order[j + 1] if j + 1 < p else -1), cols[j])

    def get(self, j: int, order: tuple[int, ...], rest: Sequence[int]) -> np.ndarray:
        """Position j's table for an order starting with ``order`` (which reaches j+1)."""
        key = (j, order[j], order[j + 1] if j + 1 < len(order) else -1)
        if key not in self.cache:
            self.fill(tuple(order) + tuple(rest))
        return self.cache[key]


def _branch_and_bound(search: _Search, cluster: Cluster, labels: Sequence[int]) -> bool:
    """Exhaustive search with pruning; leaves the best orders in `search.seen`.

    Orders are visited in `class_orders`' lexicographic order (so ties resolve the same
    way as plain enumeration). Returns False (nothing but the identity recorded) when it
    does not apply: several positions per device, too many units for the table budget, or
    an order whose assembled bottleneck differs from its own problem's (a `make_problem`
    whose columns depend on more than the device at a position and the next one).
    """
    p = len(labels)
    identity = tuple(range(p))
    search(identity)  # validates make_problem (units >= devices, one PartitionProblem)
    first = search.first_problem
    assert first is not None
    n = first.n
    if first.p != p or 8.0 * (n + 1) ** 2 * p ** 3 > _TABLE_BUDGET:
        return False
    tables = _ColumnTables(search)
    # unit times per device (position-independent by the same assumption), for the bound
    unit_time = np.asarray(first.unit_time, dtype=np.float64).reshape(n, p)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        members.setdefault(c, []).append(i)
    classes = sorted(members)
    keep = 1 + _RUNNER_UPS
    top: list[tuple[float, int, tuple[int, ...]]] = []  # (bottleneck, visit rank, order), best first
    visited = 0
    start = np.full(n + 1, np.inf)
    start[0] = 0.0  # no units on no positions costs nothing

    # a tight bar from the start: the keep-th best of a few good orders (the heuristic's);
    # pruning is strict against it, so those orders (or better ones) are still visited and
    # ranked in visit order
    seeds = sorted(search(_canonical(o, labels)) for o in _base_orders(cluster))
    seed_bar = seeds[keep - 1] if len(seeds) >= keep else math.inf

    def threshold() -> float:
        return top[-1][0] if len(top) >= keep else math.inf

    def hopeless(lb: float) -> bool:
        return lb >= threshold() or lb > seed_bar

    suffixes: dict[frozenset[int], np.ndarray] = {}  # remaining devices -> bound on the rest per start
    # parameters, gradients and optimizer state alone must fit in the devices left
    static = np.asarray(first.unit_static_bytes, dtype=np.float64)
    static_suffix = np.concatenate([np.cumsum(static[::-1])[::-1], [0.0]])
    dev_memory = np.asarray(first.device_memory, dtype=np.float64)
    # slowness of each device relative to the fastest per unit: t[u][d] >= slow[d] * fastest[u],
    # so a bottleneck T lets device d do at most T / slow[d] of "fastest time"
    fastest = unit_time.min(axis=1)
    fastest_suffix = np.concatenate([np.cumsum(fastest[::-1])[::-1], [0.0]])
    pos = fastest > 0
    slow = (unit_time[pos] / fastest[pos, None]).min(axis=0) if pos.any() else np.ones(p)

    def lower_bound(best: np.ndarray, placed: int, remaining: list[int]) -> float:
        """Any completion of a prefix of `placed` positions whose DP row is `best`: the
        rest of the units need at least their fastest remaining device's time, in total
        shared by the q positions left, and the slowest of them alone; and their static
        bytes must fit in the remaining devices' memory together."""
        q = p - placed
        key = frozenset(remaining)
        if key not in suffixes:
            f = unit_time[:, sorted(key)].min(axis=1)
            rest = np.maximum(np.concatenate([np.maximum.accumulate(f[::-1])[::-1], [0.0]]),
                              np.concatenate([np.cumsum(f[::-1])[::-1], [0.0]]) / q)
            rest = np.maximum(rest, fastest_suffix / (1.0 / slow[sorted(key)]).sum())
            if first.offload == "off":  # offloaded stages keep their static state on the host
                rest[static_suffix > dev_memory[sorted(key)].sum()] = np.inf
            suffixes[key] = rest
        lo, hi = placed, n - q + 1
        return float(np.maximum(best[lo:hi], suffixes[key][lo:hi]).min())

    def remaining(used: dict[int, int]) -> list[int]:
        return [m for c in classes for m in members[c][used[c]:]]

    def grow(order: list[int], used: dict[int, int], best: np.ndarray) -> None:
        # `best[k]`: min bottleneck of units [0, k) on positions 0..len(order)-2 (the last
        # position's table needs the device after it)
        nonlocal visited
        if len(order) == p:
            col = tables.get(p - 1, tuple(order), ())
            b = float(np.min(np.maximum(best[:, None], col), axis=0)[n])
            visited += 1
            if math.isfinite(b) and b < threshold() and b <= seed_bar:
                top.append((b, visited, tuple(order)))
                top.sort()
                del top[keep:]
            return
        for c in classes:
            if used[c] == len(members[c]):
                continue
            d = members[c][used[c]]
            order.append(d)
            used[c] += 1
            nxt = best
            if len(order) >= 2:  # position len-2's table is known now
                j = len(order) - 2
                col = tables.get(j, tuple(order), remaining(used))
                nxt = np.min(np.maximum(best[:, None], col), axis=0)
                if hopeless(lower_bound(nxt, j + 1, [order[-1]] + remaining(used))):
                    nxt = None
            if nxt is not None:
                grow(order, used, nxt)
            used[c] -= 1
            order.pop()

    grow([], {c: 0 for c in classes}, start)
    # the assumption must hold for what we return: each kept order's own problem agrees
    for b, _, order in top:
        if search(order) != b:
            search.seen, search.problems = {}, {}  # plain enumeration starts afresh
            return False
    # plain enumeration's tie rule (earliest in class_orders) = the visit rank
    ranked = sorted(top, key=lambda t: t[1])
    kept = {o: search.seen[o] for _, _, o in ranked}
    if identity not in kept:
        kept[identity] = search.seen[identity]  # a priced candidate, ranked after the kept ones
    search.seen = kept
    search.visited = visited
    return True


# --------------------------------------------------------------------------------------
# Heuristic for many devices
# --------------------------------------------------------------------------------------


def _speed(cluster: Cluster, i: int) -> float:
    d = cluster.devices[i]
    return d.peak_flops


def _base_orders(cluster: Cluster) -> list[tuple[int, ...]]:
    p = len(cluster)
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(cluster.devices):
        groups.setdefault(d.node, []).append(i)
    # nodes in order of first appearance; unknown-node devices (-1) as one group where they first appear
    node_seq: list[int] = []
    for d in cluster.devices:
        if d.node not in node_seq:
            node_seq.append(d.node)
    out: list[tuple[int, ...]] = [tuple(range(p))]
    for fast_first in (True, False):
        inner = [sorted(groups[nd], key=lambda i: (-_speed(cluster, i) if fast_first else _speed(cluster, i), i))
                 for nd in node_seq]
        # nodes: as given, and fastest node first
        node_speed = [sum(_speed(cluster, i) for i in g) / len(g) for g in inner]
        for node_order in (list(range(len(inner))), sorted(range(len(inner)), key=lambda k: (-node_speed[k], k))):
            o = tuple(i for k in node_order for i in inner[k])
            out += [o, tuple(reversed(o))]
    seen, uniq = set(), []
    for o in out:
        if o not in seen:
            seen.add(o)
            uniq.append(o)
    return uniq


def _canonical(order: tuple[int, ...], labels: Sequence[int]) -> tuple[int, ...]:
    """The representative of `order` with each class's members in index order."""
    members: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        members.setdefault(c, []).append(i)
    used = {c: 0 for c in members}
    out = []
    for i in order:
        c = labels[i]
        out.append(members[c][used[c]])
        used[c] += 1
    return tuple(out)


def _node_signature(cluster: Cluster, order: tuple[int, ...], kind: Sequence[tuple]) -> tuple | None:
    """A key equal for orders that differ only by a permutation of interchangeable whole
    nodes (`_same_node_kind` for every pair), None when the cluster has no such symmetry."""
    nodes = sorted({d.node for d in cluster.devices})
    if len(nodes) < 2 or any(nd < 0 for nd in nodes):
        return None
    members = {nd: [i for i, d in enumerate(cluster.devices) if d.node == nd] for nd in nodes}
    if not all(_same_node_kind(cluster, members[nodes[0]], members[nd], kind) for nd in nodes[1:]):
        return None
    rename: dict[int, int] = {}
    return tuple((kind[i], rename.setdefault(cluster.devices[i].node, len(rename))) for i in order)


def _heuristic(search: _Search, cluster: Cluster, labels: Sequence[int], budget: int, device_swaps: bool) -> None:
    kind0 = [_device_key(cluster, i) for i in range(len(cluster))]
    signatures: set = set()
    for o in _base_orders(cluster):
        o = _canonical(o, labels)
        sig = _node_signature(cluster, o, kind0)
        if sig is not None and sig in signatures:
            continue  # the same costs as an order already priced (a node relabelling)
        signatures.add(sig)
        search(o)
    ranked = search.best()
    if not ranked:
        return
    current, cur_b = ranked[0]
    kind = [_device_key(cluster, i) for i in range(len(cluster))]
    improved = True
    while improved and len(search.seen) < budget:
        improved = False
        moves: list[tuple[int, ...]] = []
        # swap two positions holding devices of different kinds
        p = len(current)
        for a in range(p if device_swaps else 0):
            for b in range(a + 1, p):
                if kind[current[a]] != kind[current[b]]:
                    o = list(current)
                    o[a], o[b] = o[b], o[a]
                    moves.append(_canonical(tuple(o), labels))
        # swap two whole nodes (runs of positions on one node)
        runs: list[tuple[int, int]] = []
        for j, i in enumerate(current):
            nd = cluster.devices[i].node
            if runs and nd >= 0 and cluster.devices[current[runs[-1][0]]].node == nd:
                runs[-1] = (runs[-1][0], j + 1)
            else:
                runs.append((j, j + 1))
        for x in range(len(runs)):
            for y in range(x + 1, len(runs)):
                (a0, a1), (b0, b1) = runs[x], runs[y]
                if _same_node_kind(cluster, current[a0:a1], current[b0:b1], kind):
                    continue  # a symmetry of the cluster: the same costs
                o = current[:a0] + current[b0:b1] + current[a1:b0] + current[a0:a1] + current[b1:]
                moves.append(_canonical(o, labels))
        for o in moves:
            if o in search.seen:
                continue
            if len(search.seen) >= budget:
                break
            b = search(o)
            if b < cur_b:
                current, cur_b = o, b
                improved = True
                break


def _same_node_kind(cluster: Cluster, xs: Sequence[int], ys: Sequence[int], kind: Sequence[tuple]) -> bool:
    """Whether two runs are whole nodes interchangeable by a symmetry (same devices in the
    same order, same link inside, no link naming either node or device specifically)."""
    if len(xs) != len(ys) or [kind[i] for i in xs] != [kind[i] for i in ys]:
        return False
    nx, ny = cluster.devices[xs[0]].node, cluster.devices[ys[0]].node
    if nx < 0 or ny < 0:
        return False
    if any(sum(1 for d in cluster.devices if d.node == nd) != len(xs) for nd in (nx, ny)):
        return False  # not whole nodes
    idx = cluster._node_index
    if (idx.get((nx, nx)) is None) != (idx.get((ny, ny)) is None):
        return False
    if idx.get((nx, nx)) is not None and (idx[(nx, nx)].bandwidth, idx[(nx, nx)].latency) != \
            (idx[(ny, ny)].bandwidth, idx[(ny, ny)].latency):
        return False
    if any(a != b and (a in (nx, ny) or b in (nx, ny)) for a, b in idx):
        return False
    members = set(xs) | set(ys)
    return not any(l.src in members or l.dst in members for l in cluster.links)
