"""Split backward (BI/BW), interleaved 1F1B and ZB-H1: programs, validation, bubbles, memory."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxpipe.errors import ScheduleError
from fxpipe.passes.emit_schedule import Instr, Op, Schedule, emit_schedule, peak_inflight, validate_schedule
from fxpipe.passes.render_timeline import WEIGHT_SYMBOL, render_timeline
from fxpipe.passes.simulate_schedule import simulate_schedule


def replace_programs(s: Schedule, programs) -> Schedule:
    return Schedule(s.kind, s.num_stages, s.num_microbatches, s.stage_device, tuple(map(tuple, programs)), s.train)


def compute_only(s: Schedule) -> list[str]:
    return [" ".join(str(i) for i in prog if i.peer == -1) for prog in s.programs]


# ---- an independent checker (does not use validate_schedule) --------------------------------


def independent_ok(s: Schedule) -> bool:
    """Complete (one backward form per (stage, mb)) and runs to the end when every
    instruction waits for the data it consumes."""
    p, m, sd, last = s.num_stages, s.num_microbatches, s.stage_device, s.num_stages - 1
    have = Counter((d, i) for d, prog in enumerate(s.programs) for i in prog)
    split = {(i.stage, i.mb) for _, i in have if i.op in (Op.BWD_INPUT, Op.BWD_WEIGHT)}
    want: Counter = Counter()
    for st_ in range(p):
        for mb in range(m):
            d = sd[st_]
            want[(d, Instr(Op.FWD, st_, mb))] += 1
            if st_ > 0:
                want[(d, Instr(Op.RECV_ACT, st_, mb, sd[st_ - 1]))] += 1
            if st_ < last:
                want[(d, Instr(Op.SEND_ACT, st_, mb, sd[st_ + 1]))] += 1
            if s.train:
                if (st_, mb) in split:
                    want[(d, Instr(Op.BWD_INPUT, st_, mb))] += 1
                    want[(d, Instr(Op.BWD_WEIGHT, st_, mb))] += 1
                else:
                    want[(d, Instr(Op.BWD, st_, mb))] += 1
                if st_ < last:
                    want[(d, Instr(Op.RECV_GRAD, st_, mb, sd[st_ + 1]))] += 1
                if st_ > 0:
                    want[(d, Instr(Op.SEND_GRAD, st_, mb, sd[st_ - 1]))] += 1
    if have != want:
        return False

    def inputs(i: Instr) -> list[tuple[Op, int, int]]:
        grad = Op.BWD_INPUT if (i.stage, i.mb) in split else Op.BWD
        if i.op is Op.FWD:
            return [(Op.RECV_ACT, i.stage, i.mb)] if i.stage > 0 else []
        if i.op in (Op.BWD, Op.BWD_INPUT):
            return [(Op.FWD, i.stage, i.mb)] + ([(Op.RECV_GRAD, i.stage, i.mb)] if i.stage < last else [])
        if i.op is Op.BWD_WEIGHT:
            return [(Op.BWD_INPUT, i.stage, i.mb)]
        if i.op is Op.SEND_ACT:
            return [(Op.FWD, i.stage, i.mb)]
        if i.op is Op.SEND_GRAD:
            return [(grad, i.stage, i.mb)]
        if i.op is Op.RECV_ACT:
            return [(Op.SEND_ACT, i.stage - 1, i.mb)]
        return [(Op.SEND_GRAD, i.stage + 1, i.mb)]

    done: set[tuple[Op, int, int]] = set()
    pcs = [0] * s.num_devices
    progress = True
    while progress:
        progress = False
        for d, prog in enumerate(s.programs):
            if pcs[d] < len(prog) and all(k in done for k in inputs(prog[pcs[d]])):
                i = prog[pcs[d]]
                done.add((i.op, i.stage, i.mb))
                pcs[d] += 1
                progress = True
    return all(pcs[d] == len(prog) for d, prog in enumerate(s.programs))


# ---- instruction text -----------------------------------------------------------------------


def test_split_backward_ops_text_round_trip():
    assert Op.BWD_INPUT.value == "BI" and Op.BWD_WEIGHT.value == "BW"
    for text in ["BI(s0,mb3)", "BW(s12,mb0)", "B(s1,mb2)"]:
        assert str(Instr.parse(text)) == text
    assert Instr.parse("BI(s0,mb3)") == Instr(Op.BWD_INPUT, 0, 3) == Instr("BI", 0, 3)
    for bad in ["BI(s0,mb3->d1)", "BW(s0,mb3<-d1)", "BX(s0,mb0)"]:
        with pytest.raises(ScheduleError):
            Instr.parse(bad)
    with pytest.raises(ScheduleError, match="no peer"):
        Instr(Op.BWD_WEIGHT, 0, 0, peer=1)


# ---- exact programs -------------------------------------------------------------------------


def test_zb_h1_p2_m3_exact_program():
    s = emit_schedule("zb-h1", 2, 3)
    assert [[str(i) for i in prog] for prog in s.programs] == [
        ["F(s0,mb0)", "SEND_ACT(s0,mb0->d1)", "F(s0,mb1)", "SEND_ACT(s0,mb1->d1)",
         "RECV_GRAD(s0,mb0<-d1)", "BI(s0,mb0)", "BW(s0,mb0)", "F(s0,mb2)", "SEND_ACT(s0,mb2->d1)",
         "RECV_GRAD(s0,mb1<-d1)", "BI(s0,mb1)", "BW(s0,mb1)", "RECV_GRAD(s0,mb2<-d1)", "BI(s0,mb2)", "BW(s0,mb2)"],
        # stage 1 runs one BI ahead of its BWs; the last BW fills the tail
        ["RECV_ACT(s1,mb0<-d0)", "F(s1,mb0)", "BI(s1,mb0)", "SEND_GRAD(s1,mb0->d0)",
         "RECV_ACT(s1,mb1<-d0)", "F(s1,mb1)", "BI(s1,mb1)", "SEND_GRAD(s1,mb1->d0)", "BW(s1,mb0)",
         "RECV_ACT(s1,mb2<-d0)", "F(s1,mb2)", "BI(s1,mb2)", "SEND_GRAD(s1,mb2->d0)", "BW(s1,mb1)", "BW(s1,mb2)"],
    ]
    assert s.kind == "zb-h1" and peak_inflight(s) == (2, 2)


def test_interleaved_p2_v2_m4_compute_order_is_megatrons():
    s = emit_schedule("interleaved", 4, 4, num_devices=2)
    assert s.stage_device == (0, 1, 0, 1) and s.kind == "interleaved"
    # rank 0: warmup (2-0-1)*2 + (2-1)*2 = 4 forwards (chunk 0 mb0,1; chunk 1 mb0,1), then 1F1B
    # over the table (mb0,c0)(mb1,c0)(mb0,c1)(mb1,c1)(mb2,c0)...; backwards take chunks reversed
    assert compute_only(s) == [
        "F(s0,mb0) F(s0,mb1) F(s2,mb0) F(s2,mb1) F(s0,mb2) B(s2,mb0) F(s0,mb3) B(s2,mb1) "
        "F(s2,mb2) B(s0,mb0) F(s2,mb3) B(s0,mb1) B(s2,mb2) B(s2,mb3) B(s0,mb2) B(s0,mb3)",
        "F(s1,mb0) F(s1,mb1) F(s3,mb0) B(s3,mb0) F(s3,mb1) B(s3,mb1) F(s1,mb2) B(s1,mb0) "
        "F(s1,mb3) B(s1,mb1) F(s3,mb2) B(s3,mb2) F(s3,mb3) B(s3,mb3) B(s1,mb2) B(s1,mb3)",
    ]
    assert independent_ok(s)


def test_interleaved_placement_arguments():
    # num_devices or an equivalent (relabelled) stage_device
    a = emit_schedule("interleaved", 6, 3, num_devices=3)
    b = emit_schedule("interleaved", 6, 3, stage_device=[2, 0, 1, 2, 0, 1])
    assert a.stage_device == (0, 1, 2, 0, 1, 2)
    assert [compute_only(a)[d] for d in (0, 1, 2)] == [compute_only(b)[d] for d in (2, 0, 1)]
    # v = 1 (one stage per device) is 1F1B
    one = emit_schedule("interleaved", 3, 5)
    assert compute_only(one) == compute_only(emit_schedule("1f1b", 3, 5)) and one.kind == "interleaved"
    # num_devices with other kinds: stage s on device s % D
    assert emit_schedule("1f1b", 4, 4, num_devices=2).stage_device == (0, 1, 0, 1)
    # forward-only: every kind gives the same programs
    assert emit_schedule("interleaved", 4, 2, num_devices=2, train=False) == emit_schedule(
        "forward", 4, 2, num_devices=2, train=False)
    assert emit_schedule("zb-h1", 3, 2, train=False) == emit_schedule("forward", 3, 2, train=False)


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        (("interleaved", 6, 4), {"stage_device": [0, 0, 1, 1, 2, 2]}, "not a round-robin placement"),
        (("interleaved", 5, 4), {"stage_device": [0, 1, 0, 1, 0]}, "same number v of virtual stages"),
        (("interleaved", 4, 4), {"num_devices": 8}, "num_devices=8 is more than num_stages=4"),
        (("interleaved", 4, 4), {"num_devices": 0}, "num_devices must be an int >= 1"),
        (("interleaved", 4, 4), {"num_devices": 3, "stage_device": [0, 1, 0, 1]}, "give num_devices=2"),
        (("zb-h2", 4, 4), {}, "unknown schedule kind 'zb-h2'"),
    ],
)
def test_emit_rejects_bad_interleaved_arguments(args, kwargs, fragment):
    with pytest.raises(ScheduleError) as e:
        emit_schedule(*args, **kwargs)
    assert fragment in str(e.value)


# ---- properties over random pipelines -------------------------------------------------------


@st.composite
def split_or_interleaved(draw):
    kind = draw(st.sampled_from(["interleaved", "zb-h1"]))
    p = draw(st.integers(1, 5))
    m = draw(st.integers(1, 12))
    if kind == "interleaved":
        v = draw(st.integers(1, 3))
        return emit_schedule(kind, p * v, m, num_devices=p)
    sd = None if draw(st.booleans()) else draw(st.lists(st.integers(0, p - 1), min_size=p, max_size=p))
    return emit_schedule(kind, p, m, stage_device=sd)


@given(split_or_interleaved())
def test_emitted_schedules_validate(s):
    validate_schedule(s)
    assert independent_ok(s)
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    if s.kind == "zb-h1" and s.stage_device == tuple(range(s.num_stages)):
        p, m = s.num_stages, s.num_microbatches
        # the paper's bound: every stage holds what 1F1B's first stage holds
        assert peak_inflight(s) == (min(p, m),) * p
        assert max(peak_inflight(s)) == max(peak_inflight(emit_schedule("1f1b", p, m)))


def _split_positions(s: Schedule, op: Op) -> list[tuple[int, int]]:
    return [(d, i) for d, prog in enumerate(s.programs) for i, ins in enumerate(prog) if ins.op is op]


@st.composite
def zb_schedules(draw):
    return emit_schedule("zb-h1", draw(st.integers(1, 5)), draw(st.integers(1, 8)))


@given(zb_schedules(), st.sampled_from([Op.BWD_INPUT, Op.BWD_WEIGHT]), st.data())
def test_dropping_a_bi_or_bw_is_caught(s, op, data):
    d, i = data.draw(st.sampled_from(_split_positions(s, op)))
    progs = [list(p) for p in s.programs]
    del progs[d][i]
    with pytest.raises(ScheduleError):
        validate_schedule(replace_programs(s, progs))


@given(zb_schedules(), st.sampled_from([Op.BWD_INPUT, Op.BWD_WEIGHT]), st.data())
def test_duplicating_a_bi_or_bw_is_caught(s, op, data):
    d, i = data.draw(st.sampled_from(_split_positions(s, op)))
    progs = [list(p) for p in s.programs]
    progs[d].insert(data.draw(st.integers(0, len(progs[d]))), progs[d][i])
    with pytest.raises(ScheduleError, match="duplicate"):
        validate_schedule(replace_programs(s, progs))


@given(zb_schedules(), st.data())
def test_moving_a_bw_before_its_bi_is_caught(s, data):
    d, i = data.draw(st.sampled_from(_split_positions(s, Op.BWD_WEIGHT)))
    progs = [list(p) for p in s.programs]
    bw = progs[d].pop(i)
    j = progs[d].index(Instr(Op.BWD_INPUT, bw.stage, bw.mb))
    progs[d].insert(data.draw(st.integers(0, j)), bw)
    with pytest.raises(ScheduleError, match=r"needs BI\(s\d+,mb\d+\) earlier"):
        validate_schedule(replace_programs(s, progs))


@given(zb_schedules(), st.data())
def test_mixing_backward_forms_is_caught(s, data):
    d, i = data.draw(st.sampled_from(_split_positions(s, Op.BWD_INPUT)))
    progs = [list(p) for p in s.programs]
    bi = progs[d][i]
    progs[d][i] = Instr(Op.BWD, bi.stage, bi.mb)  # B ... BW
    with pytest.raises(ScheduleError, match="use either B, or BI then BW"):
        validate_schedule(replace_programs(s, progs))


def test_validation_messages_for_split_backward():
    s = emit_schedule("zb-h1", 2, 1)
    progs = [list(p) for p in s.programs]
    progs[0].remove(Instr(Op.BWD_WEIGHT, 0, 0))
    with pytest.raises(ScheduleError, match=r"BW\(s0,mb0\) is missing: device 0 .* needs its BW after the BI") as e:
        validate_schedule(replace_programs(s, progs))
    assert e.value.device == 0 and e.value.position is None
    progs = [list(p) for p in s.programs]
    # SEND_GRAD before the BI that produces it
    k = progs[1].index(Instr(Op.SEND_GRAD, 1, 0, 0))
    progs[1][k - 1], progs[1][k] = progs[1][k], progs[1][k - 1]
    with pytest.raises(ScheduleError, match=r"SEND_GRAD\(s1,mb0->d0\): needs BI\(s1,mb0\) earlier") as e:
        validate_schedule(replace_programs(s, progs))
    assert (e.value.device, e.value.position) == (1, k - 1)
    # RECV_GRAD after the BI that needs it
    progs = [list(p) for p in s.programs]
    k = progs[0].index(Instr(Op.BWD_INPUT, 0, 0))
    progs[0][k - 1], progs[0][k] = progs[0][k], progs[0][k - 1]
    with pytest.raises(ScheduleError, match=r"BI\(s0,mb0\): needs RECV_GRAD\(s0,mb0<-d1\) earlier"):
        validate_schedule(replace_programs(s, progs))
    # forward-only schedules have no BI/BW
    f = emit_schedule("forward", 1, 1, train=False)
    with pytest.raises(ScheduleError, match="forward-only"):
        validate_schedule(replace_programs(f, [[Instr(Op.FWD, 0, 0), Instr(Op.BWD_INPUT, 0, 0)]]))


def test_peak_inflight_counts_until_bw():
    s = Schedule("custom", 1, 2, (0,), ((Instr(Op.FWD, 0, 0), Instr(Op.BWD_INPUT, 0, 0), Instr(Op.FWD, 0, 1),
                                         Instr(Op.BWD_WEIGHT, 0, 0), Instr(Op.BWD_INPUT, 0, 1),
                                         Instr(Op.BWD_WEIGHT, 0, 1)),), True)
    validate_schedule(s)
    assert peak_inflight(s) == (2,)


# ---- bubbles against theory -----------------------------------------------------------------


def mean_bubble(tl) -> float:
    return statistics.fmean(tl.bubble_fraction)


@pytest.mark.parametrize("p, m, v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 2), (4, 12, 3)])
@pytest.mark.parametrize("tf, tb", [(1.0, 2.0), (1.0, 1.0)])
def test_interleaved_bubble_matches_megatron(p, m, v, tf, tb):
    n = p * v
    tl = simulate_schedule(emit_schedule("interleaved", n, m, num_devices=p), [tf / v] * n, [tb / v] * n, [0.0] * n)
    # bubble time (p-1)(tf+tb)/v on top of m(tf+tb): a fraction (p-1)/(v m + p - 1) of the step
    assert tl.step_time == pytest.approx(m * (tf + tb) + (p - 1) * (tf + tb) / v)
    assert mean_bubble(tl) == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (8, 16)])
def test_zb_h1_bubble_is_a_third_of_1f1b(p, m):
    z = simulate_schedule(emit_schedule("zb-h1", p, m), [1.0] * p, [2.0] * p, [0.0] * p)  # BI = BW = 1
    ref = simulate_schedule(emit_schedule("1f1b", p, m), [1.0] * p, [2.0] * p, [0.0] * p)
    assert z.step_time == pytest.approx(3 * m + p - 1)
    assert mean_bubble(z) == pytest.approx((p - 1) / (3 * m + p - 1))
    idle = [b * z.step_time for b in z.bubble_fraction]
    idle_ref = [b * ref.step_time for b in ref.bubble_fraction]
    assert idle == pytest.approx([x / 3 for x in idle_ref])


def test_interleaved_with_uneven_microbatches_still_runs():
    # p does not divide m: the last group takes the leftovers; valid, slightly more bubble than theory
    for p, m, v in [(4, 6, 2), (3, 8, 3), (8, 4, 2)]:
        n = p * v
        s = emit_schedule("interleaved", n, m, num_devices=p)
        assert independent_ok(s)
        tl = simulate_schedule(s, [1.0 / v] * n, [2.0 / v] * n, [0.0] * n)
        assert mean_bubble(tl) >= (p - 1) / (v * m + p - 1) - 1e-12
        assert mean_bubble(tl) < (p - 1) / (m + p - 1)  # still better than 1F1B


# ---- simulator: split backward times and memory ---------------------------------------------


def test_split_backward_times_default_to_half_of_bwd():
    s = emit_schedule("zb-h1", 1, 1)
    tl = simulate_schedule(s, [1.0], [3.0], [0.0])
    spans = {str(e.instr): (e.start, e.end) for e in tl.events}
    assert spans == {"F(s0,mb0)": (0.0, 1.0), "BI(s0,mb0)": (1.0, 2.5), "BW(s0,mb0)": (2.5, 4.0)}
    tl = simulate_schedule(s, [1.0], [3.0], [0.0], bwd_input_time=[2.0], bwd_weight_time=[0.5])
    assert tl.step_time == 3.5 and tl.busy == (3.5,)
    with pytest.raises(ScheduleError, match="bwd_input_time has 2 entries"):
        simulate_schedule(s, [1.0], [3.0], [0.0], bwd_input_time=[1.0, 1.0])
    with pytest.raises(ScheduleError, match=r"bwd_weight_time\[0\]"):
        simulate_schedule(s, [1.0], [3.0], [0.0], bwd_weight_time=[-1.0])
    with pytest.raises(ScheduleError, match=r"activation_bytes\[0\] = nan"):
        simulate_schedule(s, [1.0], [3.0], [0.0], activation_bytes=[float("nan")])


def test_memory_step_function_exact():
    # 1F1B p=2 m=2, tf=1 tb=2: d0 F0[0,1] F1[1,2] B0[4,6] B1[7,9]; d1 F0[1,2] B0[2,4] F1[4,5] B1[5,7]
    tl = simulate_schedule(emit_schedule("1f1b", 2, 2), [1.0, 1.0], [2.0, 2.0], [0.0, 0.0],
                           activation_bytes=[10.0, 100.0])
    assert tl.memory == (
        ((0.0, 10.0), (1.0, 20.0), (6.0, 10.0), (9.0, 0.0)),
        ((0.0, 0.0), (1.0, 100.0), (7.0, 0.0)),  # B0 ends and F1 starts at 4: one instant, no dip
    )
    assert tl.peak_memory == (20.0, 100.0)
    # without activation_bytes there is no memory
    plain = simulate_schedule(emit_schedule("1f1b", 2, 2), [1.0, 1.0], [2.0, 2.0], [0.0, 0.0])
    assert plain.memory is None and plain.peak_memory is None


def test_memory_frees_at_bw_end_and_matches_inflight():
    p, m = 4, 8
    for kind in ("1f1b", "zb-h1", "gpipe"):
        s = emit_schedule(kind, p, m)
        tl = simulate_schedule(s, [1.0] * p, [2.0] * p, [0.0] * p, activation_bytes=[1.0] * p)
        assert tl.peak_memory == tuple(float(x) for x in tl.peak_inflight)
        assert all(steps[-1][1] == 0.0 for steps in tl.memory)
        for steps in tl.memory:
            times = [t for t, _ in steps]
            assert times == sorted(times) and times[0] == 0.0
    # ZB-H1 frees at BW's end, not BI's: stage 0 of p=1 m=1
    tl = simulate_schedule(emit_schedule("zb-h1", 1, 1), [1.0], [2.0], [0.0], activation_bytes=[5.0])
    assert tl.memory == (((0.0, 5.0), (3.0, 0.0)),)


def test_forward_only_memory_is_one_microbatch_at_a_time():
    tl = simulate_schedule(emit_schedule("forward", 2, 3, train=False), [1.0, 1.0], [9.0, 9.0], [0.0],
                           activation_bytes=[5.0, 7.0])
    assert tl.memory == (((0.0, 5.0), (3.0, 0.0)), ((0.0, 0.0), (1.0, 7.0), (4.0, 0.0)))
    assert tl.peak_memory == (5.0, 7.0)


def test_chrome_trace_has_split_backward_and_memory_counters():
    tl = simulate_schedule(emit_schedule("zb-h1", 2, 2), [1e-3] * 2, [2e-3] * 2, [0.0] * 2,
                           activation_bytes=[1.0, 2.0])
    trace = json.loads(json.dumps(tl.to_chrome_trace()))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    cats = Counter(e["cat"] for e in xs)
    assert cats["backward_input"] == 4 and cats["backward_weight"] == 4 and cats["forward"] == 4
    assert any(e["name"] == "BW s1 mb0" for e in xs)
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C"]
    assert {e["pid"] for e in counters} == {0, 1}
    assert max(e["args"]["bytes"] for e in counters if e["pid"] == 1) == 4.0


def test_render_shows_weight_gradients():
    tl = simulate_schedule(emit_schedule("zb-h1", 2, 2), [1e-3] * 2, [2e-3] * 2, [0.0] * 2)
    text = render_timeline(tl, width=60)
    rows = text.splitlines()[1:3]
    assert all(WEIGHT_SYMBOL in r for r in rows)
    assert "BW (weight gradient)" in " ".join(text.splitlines())
    # schedules without BI/BW keep the old legend
    plain = render_timeline(simulate_schedule(emit_schedule("1f1b", 2, 2), [1.0] * 2, [2.0] * 2, [0.0] * 2))
    assert "weight" not in plain


@given(kind=st.sampled_from(["zb-h1", "interleaved"]), p=st.integers(1, 4), m=st.integers(1, 12),
       width=st.integers(14, 120))
def test_render_new_kinds_fit_width(kind, p, m, width):
    n = 2 * p if kind == "interleaved" else p
    tl = simulate_schedule(emit_schedule(kind, n, m, num_devices=p), [1.0] * n, [2.0] * n, [0.1] * n)
    lines = render_timeline(tl, width=width).splitlines()
    assert all(len(line) <= width for line in lines)
    assert len([line for line in lines if "|" in line]) == p


def test_benchmark_quick_grid_matches_theory():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "schedules.py"
    spec = importlib.util.spec_from_file_location("fxpipe_bench_schedules", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    r = bench.run(bench.Config(devices=(2, 4), microbatches=(4, 8)))
    assert r["all_within_tolerance"]
    zb = [x for x in r["rows"] if x["kind"] == "zb-h1"]
    assert all(x["idle_ratio_vs_1f1b"] == pytest.approx(1 / 3) for x in zb)
    assert "| 4 | 8 |" in bench.markdown(r)
