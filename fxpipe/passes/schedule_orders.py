"""Per-kind compute orders of the standard schedules, before messages are added.

GPipe, 1F1B (`_stage_orders`), ZB-H1 (`_zb_h1_order`) and Megatron's interleaved 1F1B
(`_interleaved_orders`) as (op, microbatch) or (op, stage, microbatch) lists, and
`_merge_onto_devices`, which interleaves the orders of stages sharing a device.
`emit_schedule` turns them into device programs (RECVs and SENDs around each compute);
they are separate so each kind's order reads on its own, apart from argument checking,
message placement and validation.
"""

from __future__ import annotations

from fxpipe.errors import ScheduleError
from fxpipe.passes.schedule_ir import Op

__all__: list[str] = []  # private to `emit_schedule`


def _zb_h1_order(p: int, m: int, s: int) -> list[tuple[Op, int]]:
    """Stage s of ZB-H1 (Qi et al., 2024): 1F1B's order of F and BI, with BW deferred.

    Warmup and steady state are 1F1B's with every B replaced by BI. The BW of the oldest
    pending microbatch follows each BI from the (s+1)-th on, so stage s runs s BIs ahead of
    its BWs and the leftover s BWs fill the tail of the step (where 1F1B idles waiting for
    gradients). Every stage then holds min(p, m) microbatches at its peak: the peak of
    1F1B's first stage, which is the paper's memory bound (the peak over all workers is no
    more than 1F1B's; every worker keeps the same number in flight). A per-stage bound of
    p-s, as 1F1B has, cannot reach the third: the last stage would have to run F, BI, BW of
    one microbatch before the next F, leaving 2(p-1) T_F of bubble. With T_F = T_BI = T_BW
    the bubble is (p-1) T_F instead of 1F1B's 3(p-1) T_F: a third (for m >= p).
    """
    warmup = min(p - s - 1, m)
    order: list[tuple[Op, int]] = [(Op.FWD, mb) for mb in range(warmup)]
    n_bi = next_w = 0
    for i in range(m):
        if i < m - warmup:
            order.append((Op.FWD, warmup + i))
        order.append((Op.BWD_INPUT, i))
        n_bi += 1
        if n_bi > s:
            order.append((Op.BWD_WEIGHT, next_w))
            next_w += 1
    order += [(Op.BWD_WEIGHT, mb) for mb in range(next_w, m)]
    return order


def _stage_orders(kind: str, p: int, m: int, train: bool) -> list[list[tuple[Op, int]]]:
    """Per stage, the order of its compute (op, mb); messages are added around them later."""
    orders: list[list[tuple[Op, int]]] = []
    for s in range(p):
        if not train or kind == "forward":
            orders.append([(Op.FWD, mb) for mb in range(m)])
        elif kind == "gpipe":
            orders.append([(Op.FWD, mb) for mb in range(m)] + [(Op.BWD, mb) for mb in range(m)])
        elif kind == "zb-h1":
            orders.append(_zb_h1_order(p, m, s))
        else:  # 1f1b, Megatron's PipeDream-Flush (also interleaved with one stage per device)
            warmup = min(p - s - 1, m)
            order = [(Op.FWD, mb) for mb in range(warmup)]
            for i in range(m - warmup):
                order += [(Op.FWD, warmup + i), (Op.BWD, i)]
            order += [(Op.BWD, mb) for mb in range(m - warmup, m)]
            orders.append(order)
    return orders


def _merge_onto_devices(
    orders: list[list[tuple[Op, int]]], stage_device: tuple[int, ...], num_devices: int
) -> list[list[tuple[Op, int, int]]]:
    """Interleave the per-stage orders of stages that share a device.

    Plays the pipeline in unit ticks: each tick, every device runs at most one compute op
    whose inputs were produced in an earlier tick, choosing among the heads of its stages'
    orders (backward first to free memory, then the oldest microbatch). Keeping each stage's
    own order keeps its activation bound; only running ready ops keeps the result
    deadlock-free whenever the one-stage-per-device pipeline is (the message system is a
    Kahn network, so any schedule of ready ops completes). With one stage per device this is
    just the per-stage order.
    """
    p = len(orders)
    last = p - 1
    heads = [0] * p
    done_at: dict[tuple[Op, int, int], int] = {}
    # the op that produces each stage's input gradient (BI in split-backward orders)
    grad_op = [Op.BWD_INPUT if any(op is Op.BWD_INPUT for op, _ in o) else Op.BWD for o in orders]
    stages_of: list[list[int]] = [[] for _ in range(num_devices)]
    for s, d in enumerate(stage_device):
        stages_of[d].append(s)
    out: list[list[tuple[Op, int, int]]] = [[] for _ in range(num_devices)]
    remaining = sum(len(o) for o in orders)
    tick = 0
    while remaining:
        ran = []
        for d in range(num_devices):
            best = None
            for s in stages_of[d]:
                if heads[s] == len(orders[s]):
                    continue
                op, mb = orders[s][heads[s]]
                if op is Op.FWD:
                    dep = (Op.FWD, s - 1, mb) if s > 0 else None
                elif op is Op.BWD_WEIGHT:
                    dep = None  # its BI is earlier in the same stage's order
                else:
                    dep = (grad_op[s + 1], s + 1, mb) if s < last else None
                if dep is not None and done_at.get(dep, tick) >= tick:
                    continue  # input not produced in an earlier tick
                key = (op is Op.FWD, mb, s)
                if best is None or key < best[0]:
                    best = (key, s, op, mb)
            if best is not None:
                _, s, op, mb = best
                ran.append((d, s, op, mb))
        if not ran:  # cannot happen for the emitted orders; guard against future kinds
            raise ScheduleError("internal: emitted per-stage orders deadlock; report this as a bug")
        for d, s, op, mb in ran:
            heads[s] += 1
            done_at[(op, s, mb)] = tick
            out[d].append((op, s, mb))
            remaining -= 1
        tick += 1
    return out


def _interleaved_orders(p: int, v: int, m: int) -> list[list[tuple[Op, int, int]]]:
    """Megatron's interleaved 1F1B: per rank r (0..p-1), its compute as (op, stage, mb).

    Rank r holds the v virtual stages c*p + r (c = 0..v-1, "model chunks"). Its m*v
    forwards run in the order of a table that takes the microbatches in groups of p and,
    per group, runs chunk 0 of the group, then chunk 1, ..., then chunk v-1. When p does
    not divide m the last group takes the leftovers (it holds p..2p-1 microbatches; all m
    when m < p), as Megatron-Core's schedule table does. Backwards follow the same table
    with the chunks reversed (chunk v-1 first). Rank r runs (p-r-1)*2 + (v-1)*g warmup
    forwards, g being the largest group (p when p divides m: Megatron's count), or all of
    them when m == p or when that exceeds m*v; then it alternates one forward, one
    backward; then it drains the remaining backwards.
    """
    n_groups = max(1, m // p)
    groups = [(g * p, m if g == n_groups - 1 else (g + 1) * p) for g in range(n_groups)]
    g_max = max(stop - start for start, stop in groups)
    table: list[tuple[int, int]] = []  # virtual index k -> (mb, chunk)
    for start, stop in groups:
        for c in range(v):
            table += [(mb, c) for mb in range(start, stop)]
    total = m * v
    out: list[list[tuple[Op, int, int]]] = []
    for r in range(p):
        warm = total if m == p else min((p - r - 1) * 2 + (v - 1) * g_max, total)
        fwd = [(Op.FWD, c * p + r, mb) for mb, c in table]
        bwd = [(Op.BWD, (v - 1 - c) * p + r, mb) for mb, c in table]
        ops = fwd[:warm]
        for k in range(total - warm):
            ops += [fwd[warm + k], bwd[k]]
        ops += bwd[total - warm :]
        out.append(ops)
    return out
