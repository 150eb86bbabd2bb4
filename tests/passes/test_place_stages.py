"""Tests for fxpipe.passes.place_stages: symmetry classes, exactness against brute force over
device orders x contiguous partitions, the heuristic's bound, and infeasibility errors."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fxpipe.compiler.cluster import Cluster, Device, Link, NodeLink
from fxpipe.errors import PlanError
from fxpipe.passes.partition_stages import PartitionProblem, all_partitions, evaluate_partition
from fxpipe.passes.place_stages import Placement, _count_orders, class_orders, device_classes, place_stages


def problem_maker(cluster: Cluster, work, act_bytes, bbytes, static=None, inflight=None):
    """make_problem(order) for a toy cost model: unit time = work / device speed, boundary
    time over the link between consecutive devices of the order (both directions)."""
    n = len(work)
    static = static or [0.0] * n

    def make(order):
        sub = cluster.subset(order)
        p = len(order)
        unit_time = tuple(tuple(w / d.peak_flops for d in sub.devices) for w in work)
        btime = tuple(tuple(2 * sub.link(j, j + 1).transfer_time(bbytes[k]) for j in range(p - 1))
                      for k in range(n - 1))
        return PartitionProblem(
            unit_names=tuple(f"u{i}" for i in range(n)), unit_time=unit_time, boundary_time=btime,
            unit_static_bytes=tuple(static), unit_activation_bytes=tuple(act_bytes),
            boundary_bytes=tuple(bbytes), inflight=tuple(inflight or [p - j for j in range(p)]),
            device_memory=tuple(d.memory for d in sub.devices), device_names=tuple(d.name for d in sub.devices))

    return make


def brute_force(make, p: int, n: int) -> float:
    best = math.inf
    for order in itertools.permutations(range(p)):
        prob = make(order)
        for part in all_partitions(prob):
            if part.fits:
                best = min(best, part.bottleneck)
    return best


def dev(name, speed, memory, node=-1):
    return Device(name, "cuda", speed, 1e12, memory, 0.0, 1, node=node)


# ----------------------------------------------------------------------------- symmetry


def test_identical_devices_in_one_node_are_one_class():
    c = Cluster.preset("h100", 8)
    assert device_classes(c) == (0,) * 8
    assert list(class_orders(device_classes(c))) == [tuple(range(8))]


def test_two_nodes_of_different_gpus_give_70_orders():
    c = Cluster.concat(Cluster.preset("h100", 4), Cluster.preset("a100", 4))
    labels = device_classes(c)
    assert labels == (0, 0, 0, 0, 1, 1, 1, 1)
    assert len(set(class_orders(labels))) == 70


def test_same_gpu_in_two_nodes_is_not_interchangeable_across_nodes():
    c = Cluster.preset("h100", 4, per_node=2)
    assert device_classes(c) == (0, 0, 1, 1)  # swapping across nodes changes which links are fast


def test_class_orders_are_all_distinct_permutations():
    labels = (0, 1, 0, 2)
    orders = list(class_orders(labels))
    assert len(orders) == len(set(orders)) == 12
    assert orders[0] == (0, 2, 1, 3)  # each class's members in index order
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)


# ----------------------------------------------------------------------------- exactness


@st.composite
def instances(draw):
    p = draw(st.integers(2, 4))
    n = draw(st.integers(p, 12))
    speeds = draw(st.lists(st.sampled_from([1.0, 2.0, 3.0, 5.0]), min_size=p, max_size=p))
    mems = draw(st.lists(st.sampled_from([6.0, 10.0, 40.0, 1e9]), min_size=p, max_size=p))
    nodes = draw(st.lists(st.integers(0, 1), min_size=p, max_size=p))
    devices = tuple(dev(f"d{i}", s, m, node) for i, (s, m, node) in enumerate(zip(speeds, mems, nodes)))
    intra = draw(st.sampled_from([4.0, 8.0]))
    inter = draw(st.sampled_from([0.5, 1.0]))
    extra = ()
    if draw(st.booleans()):  # one explicit device link overriding the node links
        extra = (Link(0, 1, draw(st.sampled_from([0.25, 16.0])), 0.0),)
    cluster = Cluster(devices, extra, (NodeLink(0, 0, intra, 0.01), NodeLink(1, 1, intra / 2, 0.01),
                                       NodeLink(-1, -1, inter, 0.05)))
    work = draw(st.lists(st.sampled_from([1.0, 2.0, 3.0, 4.0, 7.0]), min_size=n, max_size=n))
    act = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n))
    bbytes = draw(st.lists(st.sampled_from([0.0, 1.0, 4.0, 8.0]), min_size=n - 1, max_size=n - 1))
    static = draw(st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=n, max_size=n))
    return cluster, problem_maker(cluster, work, act, bbytes, static), p, n


@given(instances())
def test_placement_equals_brute_force_over_orders_and_partitions(inst):
    cluster, make, p, n = inst
    expected = brute_force(make, p, n)
    if not math.isfinite(expected):
        with pytest.raises(PlanError):
            place_stages(make, cluster)
        return
    pl = place_stages(make, cluster)
    assert pl.method == "exhaustive"
    assert pl.partition.bottleneck == expected
    assert pl.partition.fits
    # the placement's partition is the one of its own order's problem
    assert evaluate_partition(make(pl.order), pl.partition.bounds).bottleneck == expected
    assert all(b >= expected for _, b in pl.runner_ups)


def test_heavy_boundary_goes_over_the_fast_link():
    # 4 equal devices, two nodes; the model's middle boundary is huge, the others tiny:
    # the best order keeps the big cut inside a node... every cut crosses some link, so
    # the inter-node link must carry a small boundary.
    c = Cluster((dev("a0", 1.0, 1e18, 0), dev("b0", 1.0, 1e18, 1), dev("a1", 1.0, 1e18, 0),
                 dev("b1", 1.0, 1e18, 1)), (), (NodeLink(0, 0, 100.0), NodeLink(1, 1, 100.0),
                                                    NodeLink(-1, -1, 1.0)))
    work = [1.0] * 8
    bbytes = [0.1, 50.0, 0.1, 0.1, 0.1, 50.0, 0.1]
    make = problem_maker(c, work, [0.0] * 8, bbytes)
    pl = place_stages(make, c)
    assert pl.partition.bottleneck == brute_force(make, 4, 8)
    nodes = [c.devices[i].node for i in pl.order]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3]  # one inter-node hop, in the middle
    assert pl.runner_ups and pl.runner_ups[0][1] >= pl.partition.bottleneck


def test_fast_device_gets_more_work():
    c = Cluster((dev("slow", 1.0, 1e18), dev("fast", 3.0, 1e18)), (Link(0, 1, 1e9),))
    make = problem_maker(c, [1.0] * 8, [0.0] * 8, [0.0] * 7)
    pl = place_stages(make, c)
    sizes = {pl.order[j]: b - a for j, (a, b) in enumerate(pl.partition.bounds)}
    assert sizes[1] == 6 and sizes[0] == 2
    assert pl.partition.bottleneck == pytest.approx(2.0)


def test_identity_order_on_equivalent_devices():
    c = Cluster.preset("a100", 4)
    make = problem_maker(c, [1e12] * 8, [0.0] * 8, [1e6] * 7)
    pl = place_stages(make, c)
    assert pl.order == (0, 1, 2, 3) and pl.candidates == 1 and isinstance(pl, Placement)


# ----------------------------------------------------------------------------- heuristic


def test_heuristic_beyond_the_limit_reports_a_valid_bound():
    c = Cluster.concat(Cluster.preset("a100", 8), Cluster.preset("h100", 8))
    n = 40
    make = problem_maker(c, [1e12] * n, [1e8] * n, [5e7] * (n - 1))
    pl = place_stages(make, c, exhaustive_limit=8)
    assert pl.method == "heuristic"
    assert pl.lower_bound is not None and 0 < pl.lower_bound <= pl.partition.bottleneck
    # the H100s (faster) get more units than the A100s
    per_dev = {pl.order[j]: b - a for j, (a, b) in enumerate(pl.partition.bounds)}
    assert sum(per_dev[i] for i in range(8, 16)) > sum(per_dev[i] for i in range(8))
    assert "heuristic" in pl.summary()


def test_heuristic_matches_exhaustive_on_a_small_cluster():
    c = Cluster.concat(Cluster.preset("a100", 2), Cluster.preset("l4", 2), link=(10e9, 1e-5))
    n = 10
    make = problem_maker(c, [1e12, 2e12] * 5, [0.0] * n, [1e8] * (n - 1))
    exact = place_stages(make, c)
    heur = place_stages(make, c, exhaustive_limit=2)
    assert heur.method == "heuristic" and exact.method == "exhaustive"
    assert heur.partition.bottleneck >= exact.partition.bottleneck
    assert heur.lower_bound <= exact.partition.bottleneck


def test_many_identical_gpus_are_planned_with_few_candidates():
    c = Cluster.preset("h100", 64, per_node=8)
    n = 80
    make = problem_maker(c, [1e12] * n, [0.0] * n, [1e8] * (n - 1))
    pl = place_stages(make, c)
    assert pl.method == "heuristic" and pl.candidates <= 8
    assert pl.order == tuple(range(64))


# ----------------------------------------------------------------------------- errors


def test_nothing_fits_names_the_minimum_memory():
    c = Cluster((dev("a", 1.0, 1.0), dev("b", 1.0, 1.0)), (Link(0, 1, 1.0),))
    make = problem_maker(c, [1.0] * 4, [0.0] * 4, [0.0] * 3, static=[1.0] * 4)
    with pytest.raises(PlanError, match="(?s)no partition of the 4 units onto the 2 devices fits.*use more devices \\(at least 4"):
        place_stages(make, c)


def test_more_devices_than_units_is_refused():
    c = Cluster.preset("h100", 4)
    make = problem_maker(c, [1.0] * 3, [0.0] * 3, [0.0] * 2)
    with pytest.raises(PlanError, match="3 units but 4 devices"):
        place_stages(make, c)


def test_bad_make_problem_is_refused():
    with pytest.raises(PlanError, match="not a PartitionProblem"):
        place_stages(lambda order: None, Cluster.preset("h100", 2))


# ----------------------------------------------------------------------------- branch and bound


@st.composite
def distinct_instances(draw):
    """5-6 devices that differ in speed, memory or node: hundreds of distinct orders."""
    p = draw(st.integers(5, 6))
    n = draw(st.integers(p, 14))
    speeds = draw(st.lists(st.sampled_from([1.0, 1.5, 2.0, 3.0, 5.0]), min_size=p, max_size=p))
    mems = draw(st.lists(st.sampled_from([8.0, 12.0, 40.0, 1e9]), min_size=p, max_size=p))
    nodes = draw(st.lists(st.integers(0, 2), min_size=p, max_size=p))
    devices = tuple(dev(f"d{i}", s, m, node) for i, (s, m, node) in enumerate(zip(speeds, mems, nodes)))
    cluster = Cluster(devices, (), (NodeLink(0, 0, 8.0, 0.01), NodeLink(1, 1, 2.0, 0.01), NodeLink(2, 2, 4.0, 0.0),
                                    NodeLink(-1, -1, 0.5, 0.05)))
    work = draw(st.lists(st.sampled_from([1.0, 2.0, 3.0, 4.0, 7.0]), min_size=n, max_size=n))
    act = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n))
    bbytes = draw(st.lists(st.sampled_from([0.0, 1.0, 4.0, 8.0]), min_size=n - 1, max_size=n - 1))
    static = draw(st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=n, max_size=n))
    return cluster, problem_maker(cluster, work, act, bbytes, static)


@settings(max_examples=20, deadline=None)
@given(distinct_instances())
def test_branch_and_bound_equals_plain_enumeration(inst):
    import fxpipe.passes.place_stages as ps

    cluster, make = inst
    assume(_count_orders(device_classes(cluster)) > ps._PRUNE_FROM)  # else plain enumeration runs
    try:
        pruned = place_stages(make, cluster)
    except PlanError as e:
        pruned = e
    saved = ps._PRUNE_FROM
    ps._PRUNE_FROM = 10**9
    try:
        try:
            plain = place_stages(make, cluster)
        except PlanError as e:
            plain = e
    finally:
        ps._PRUNE_FROM = saved
    if isinstance(plain, PlanError):
        assert isinstance(pruned, PlanError) and str(pruned) == str(plain)
        return
    assert pruned.order == plain.order and pruned.partition == plain.partition
    assert pruned.runner_ups == plain.runner_ups  # the same four best orders, same tie order
    assert pruned.method == "exhaustive"


def test_eight_distinct_devices_are_searched_exactly_without_visiting_every_order():
    speeds = [1.0, 1.3, 1.7, 2.0, 2.6, 3.1, 4.0, 5.5]
    devices = tuple(dev(f"d{i}", s, 1e9, i % 3) for i, s in enumerate(speeds))
    cluster = Cluster(devices, (), (NodeLink(0, 0, 8.0, 0.0), NodeLink(1, 1, 4.0, 0.0), NodeLink(2, 2, 2.0, 0.0),
                                    NodeLink(-1, -1, 1.0, 0.01)))
    work = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0, 8.0, 9.0, 7.0, 9.0, 3.0]
    calls = []
    make = problem_maker(cluster, work, [0.5] * 16, [2.0] * 15)

    def counting(order):
        calls.append(order)
        return make(order)

    assert _count_orders(device_classes(cluster)) == 40320
    pl = place_stages(counting, cluster)
    assert pl.method == "exhaustive" and len(calls) < 2000
    # optimal over all 40,320 orders: no order's optimal partition beats it (checked on the
    # orders a greedy would try: fastest devices on the heaviest units, both directions)
    from fxpipe.passes.partition_stages import partition_stages

    for order in [tuple(range(8)), tuple(reversed(range(8))), tuple(sorted(range(8), key=lambda i: -speeds[i]))]:
        assert partition_stages(make(order)).bottleneck >= pl.partition.bottleneck
