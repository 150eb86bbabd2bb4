"""Schedules as data: exact programs, validation, memory bound, round trip, mutations."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpipe.errors import ScheduleError
from fxpipe.passes.emit_schedule import (
    Instr,
    Op,
    Schedule,
    emit_schedule,
    peak_inflight,
    validate_schedule,
)

FAST = settings(derandomize=True, deadline=None, max_examples=60)


def listing(s: Schedule) -> list[list[str]]:
    return [[str(i) for i in prog] for prog in s.programs]


def replace_programs(s: Schedule, programs) -> Schedule:
    return Schedule(s.kind, s.num_stages, s.num_microbatches, s.stage_device, tuple(map(tuple, programs)), s.train)


# ---- an independent checker (does not use validate_schedule) --------------------------------


def expected_instrs(s: Schedule) -> Counter:
    """Every instruction a complete schedule must hold, built from the rules alone."""
    p, m, sd = s.num_stages, s.num_microbatches, s.stage_device
    want: Counter = Counter()
    for st_ in range(p):
        for mb in range(m):
            want[(sd[st_], Instr(Op.FWD, st_, mb))] += 1
            if st_ > 0:
                want[(sd[st_], Instr(Op.RECV_ACT, st_, mb, sd[st_ - 1]))] += 1
            if st_ < p - 1:
                want[(sd[st_], Instr(Op.SEND_ACT, st_, mb, sd[st_ + 1]))] += 1
            if s.train:
                want[(sd[st_], Instr(Op.BWD, st_, mb))] += 1
                if st_ < p - 1:
                    want[(sd[st_], Instr(Op.RECV_GRAD, st_, mb, sd[st_ + 1]))] += 1
                if st_ > 0:
                    want[(sd[st_], Instr(Op.SEND_GRAD, st_, mb, sd[st_ - 1]))] += 1
    return want


def independent_ok(s: Schedule) -> bool:
    """Complete, and runs to the end when every instruction waits for the data it consumes."""
    have = Counter((d, i) for d, prog in enumerate(s.programs) for i in prog)
    if have != expected_instrs(s):
        return False
    last = s.num_stages - 1
    done: set[tuple[Op, int, int]] = set()

    def inputs(i: Instr) -> list[tuple[Op, int, int]]:
        if i.op is Op.FWD:
            return [(Op.RECV_ACT, i.stage, i.mb)] if i.stage > 0 else []
        if i.op is Op.BWD:
            return [(Op.FWD, i.stage, i.mb)] + ([(Op.RECV_GRAD, i.stage, i.mb)] if i.stage < last else [])
        if i.op is Op.SEND_ACT:
            return [(Op.FWD, i.stage, i.mb)]
        if i.op is Op.SEND_GRAD:
            return [(Op.BWD, i.stage, i.mb)]
        if i.op is Op.RECV_ACT:
            return [(Op.SEND_ACT, i.stage - 1, i.mb)]
        return [(Op.SEND_GRAD, i.stage + 1, i.mb)]

    pcs = [0] * s.num_devices
    progress = True
    while progress:
        progress = False
        for d, prog in enumerate(s.programs):  # one instruction per device per round
            if pcs[d] < len(prog) and all(k in done for k in inputs(prog[pcs[d]])):
                i = prog[pcs[d]]
                done.add((i.op, i.stage, i.mb))
                pcs[d] += 1
                progress = True
    return all(pcs[d] == len(p) for d, p in enumerate(s.programs))


# ---- exact programs -------------------------------------------------------------------------


def test_1f1b_p2_m2_exact_program():
    s = emit_schedule("1f1b", 2, 2)
    assert (s.kind, s.num_stages, s.num_microbatches, s.stage_device, s.train, s.num_devices) == (
        "1f1b", 2, 2, (0, 1), True, 2,
    )
    assert listing(s) == [
        ["F(s0,mb0)", "SEND_ACT(s0,mb0->d1)", "F(s0,mb1)", "SEND_ACT(s0,mb1->d1)",
         "RECV_GRAD(s0,mb0<-d1)", "B(s0,mb0)", "RECV_GRAD(s0,mb1<-d1)", "B(s0,mb1)"],
        ["RECV_ACT(s1,mb0<-d0)", "F(s1,mb0)", "B(s1,mb0)", "SEND_GRAD(s1,mb0->d0)",
         "RECV_ACT(s1,mb1<-d0)", "F(s1,mb1)", "B(s1,mb1)", "SEND_GRAD(s1,mb1->d0)"],
    ]


def test_gpipe_p2_m2_exact_program():
    s = emit_schedule("gpipe", 2, 2)
    assert listing(s) == [
        ["F(s0,mb0)", "SEND_ACT(s0,mb0->d1)", "F(s0,mb1)", "SEND_ACT(s0,mb1->d1)",
         "RECV_GRAD(s0,mb0<-d1)", "B(s0,mb0)", "RECV_GRAD(s0,mb1<-d1)", "B(s0,mb1)"],
        ["RECV_ACT(s1,mb0<-d0)", "F(s1,mb0)", "RECV_ACT(s1,mb1<-d0)", "F(s1,mb1)",
         "B(s1,mb0)", "SEND_GRAD(s1,mb0->d0)", "B(s1,mb1)", "SEND_GRAD(s1,mb1->d0)"],
    ]


def compute_only(s: Schedule) -> list[str]:
    return [" ".join(str(i) for i in prog if i.op in (Op.FWD, Op.BWD)) for prog in s.programs]


def test_1f1b_p3_m4_compute_order_is_warmup_steady_cooldown():
    assert compute_only(emit_schedule("1f1b", 3, 4)) == [
        # warmup 2, steady (F,B) x2, cooldown 2
        "F(s0,mb0) F(s0,mb1) F(s0,mb2) B(s0,mb0) F(s0,mb3) B(s0,mb1) B(s0,mb2) B(s0,mb3)",
        "F(s1,mb0) F(s1,mb1) B(s1,mb0) F(s1,mb2) B(s1,mb1) F(s1,mb3) B(s1,mb2) B(s1,mb3)",
        "F(s2,mb0) B(s2,mb0) F(s2,mb1) B(s2,mb1) F(s2,mb2) B(s2,mb2) F(s2,mb3) B(s2,mb3)",
    ]


def test_1f1b_with_fewer_microbatches_than_stages_is_all_forward_then_backward():
    assert compute_only(emit_schedule("1f1b", 4, 2))[0] == "F(s0,mb0) F(s0,mb1) B(s0,mb0) B(s0,mb1)"


def test_single_stage_has_no_messages():
    s = emit_schedule("1f1b", 1, 3)
    assert listing(s) == [["F(s0,mb0)", "B(s0,mb0)", "F(s0,mb1)", "B(s0,mb1)", "F(s0,mb2)", "B(s0,mb2)"]]


def test_forward_only_programs():
    s = emit_schedule("forward", 2, 2, train=False)
    assert listing(s) == [
        ["F(s0,mb0)", "SEND_ACT(s0,mb0->d1)", "F(s0,mb1)", "SEND_ACT(s0,mb1->d1)"],
        ["RECV_ACT(s1,mb0<-d0)", "F(s1,mb0)", "RECV_ACT(s1,mb1<-d0)", "F(s1,mb1)"],
    ]
    assert not s.train and s.kind == "forward"
    # gpipe/1f1b without training are the same forward-only programs
    for kind in ("gpipe", "1f1b"):
        assert emit_schedule(kind, 2, 2, train=False) == s
    assert peak_inflight(s) == (1, 1)


def test_shared_device_still_sends_locally():
    s = emit_schedule("gpipe", 2, 1, stage_device=[0, 0])
    assert s.num_devices == 1
    assert listing(s) == [
        ["F(s0,mb0)", "SEND_ACT(s0,mb0->d0)", "RECV_ACT(s1,mb0<-d0)", "F(s1,mb0)",
         "B(s1,mb0)", "SEND_GRAD(s1,mb0->d0)", "RECV_GRAD(s0,mb0<-d0)", "B(s0,mb0)"]
    ]


def test_non_contiguous_placement_validates_and_keeps_stage_orders():
    s = emit_schedule("1f1b", 4, 6, stage_device=[0, 1, 0, 1])
    validate_schedule(s)
    assert independent_ok(s)
    ref = emit_schedule("1f1b", 4, 6)
    for stage in range(4):
        mine = [i for prog in s.programs for i in prog if i.stage == stage and i.op in (Op.FWD, Op.BWD)]
        theirs = [i for i in ref.programs[stage] if i.op in (Op.FWD, Op.BWD)]
        assert mine == theirs
    assert peak_inflight(s) == (4, 3, 2, 1)


# ---- argument errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        (("zigzag", 2, 2), {}, "unknown schedule kind 'zigzag'"),
        (("1f1b", 0, 2), {}, "num_stages must be an int >= 1"),
        (("1f1b", 2, 0), {}, "num_microbatches must be an int >= 1"),
        (("1f1b", 2, 2), {"stage_device": [0]}, "stage_device has 1 entries for 2 stages"),
        (("1f1b", 2, 2), {"stage_device": [0, -1]}, "stage_device[1] = -1"),
        (("forward", 2, 2), {}, "pass train=False"),
        (("gpipe", 2, True), {}, "num_microbatches must be an int"),
    ],
)
def test_emit_rejects_bad_arguments(args, kwargs, fragment):
    with pytest.raises(ScheduleError) as e:
        emit_schedule(*args, **kwargs)
    assert fragment in str(e.value)


# ---- memory bound ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16, 32])
def test_peak_inflight(p, m):
    assert peak_inflight(emit_schedule("1f1b", p, m)) == tuple(min(p - s, m) for s in range(p))
    assert peak_inflight(emit_schedule("gpipe", p, m)) == (m,) * p
    assert peak_inflight(emit_schedule("forward", p, m, train=False)) == (1,) * p


# ---- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s",
    [
        emit_schedule("1f1b", 4, 8),
        emit_schedule("gpipe", 3, 2, stage_device=[0, 0, 1]),
        emit_schedule("forward", 2, 3, train=False),
    ],
)
def test_to_dict_round_trip_through_json(s):
    d = s.to_dict()
    back = Schedule.from_dict(json.loads(json.dumps(d)))
    assert back == s
    assert back.to_dict() == d
    assert d["programs"][0][0] == str(s.programs[0][0])


def test_instr_text_round_trip_and_checks():
    for text in ["F(s0,mb3)", "B(s12,mb0)", "SEND_ACT(s0,mb3->d1)", "RECV_ACT(s1,mb3<-d0)",
                 "SEND_GRAD(s1,mb3->d0)", "RECV_GRAD(s0,mb3<-d1)"]:
        assert str(Instr.parse(text)) == text
    assert Instr("F", 0, 1) == Instr(Op.FWD, 0, 1)
    for bad in ["F(s0,mb3->d1)", "SEND_ACT(s0,mb3)", "SEND_ACT(s0,mb3<-d1)", "X(s0,mb0)", "F(s-1,mb0)"]:
        with pytest.raises(ScheduleError):
            Instr.parse(bad)
    with pytest.raises(ScheduleError, match="needs peer"):
        Instr(Op.SEND_ACT, 0, 0)
    with pytest.raises(ScheduleError, match="no peer"):
        Instr(Op.FWD, 0, 0, peer=1)


def _good_dict():
    return emit_schedule("1f1b", 2, 2).to_dict()


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.pop("programs"), "missing field(s) ['programs']"),
        (lambda d: d.update(version=99), "'version' is 99"),
        (lambda d: d.update(format="other"), "'format'"),
        (lambda d: d.update(extra=1), "unknown field(s) ['extra']"),
        (lambda d: d.update(num_stages="2"), "'num_stages' must be an int"),
        (lambda d: d.update(train="yes"), "'train'"),
        (lambda d: d.update(stage_device=[0]), "stage_device has 1 entries"),
        (lambda d: d.update(stage_device=[0, 5]), "stage_device[1] = 5"),
        (lambda d: d["programs"][1].__setitem__(2, "F(s1 mb0)"), "programs[1][2]"),
        (lambda d: d.update(programs="x"), "'programs' must be a list"),
    ],
)
def test_from_dict_names_the_bad_field(mutate, fragment):
    d = _good_dict()
    mutate(d)
    with pytest.raises(ScheduleError) as e:
        Schedule.from_dict(d)
    assert fragment in str(e.value)


def test_from_dict_rejects_non_dict():
    with pytest.raises(ScheduleError, match="must be a dict"):
        Schedule.from_dict([1, 2])


# ---- validation messages --------------------------------------------------------------------


def test_validate_reports_wrong_device_with_position():
    s = emit_schedule("gpipe", 2, 1)
    progs = [list(p) for p in s.programs]
    progs[1].insert(0, progs[0].pop(0))  # F(s0,mb0) moved to device 1
    with pytest.raises(ScheduleError) as e:
        validate_schedule(replace_programs(s, progs))
    assert "device 1, position 0: F(s0,mb0): stage 0 runs on device 0" in str(e.value)


def test_validate_reports_order_violation():
    s = emit_schedule("gpipe", 1, 1)
    with pytest.raises(ScheduleError) as e:
        validate_schedule(replace_programs(s, [[Instr(Op.BWD, 0, 0), Instr(Op.FWD, 0, 0)]]))
    assert "device 0, position 0: B(s0,mb0): needs F(s0,mb0) earlier on device 0, but it comes later" in str(e.value)


def test_validate_reports_unmatched_recv():
    s = emit_schedule("forward", 2, 1, train=False)
    progs = [[Instr(Op.FWD, 0, 0)], list(s.programs[1])]
    with pytest.raises(ScheduleError) as e:
        validate_schedule(replace_programs(s, progs))
    assert "device 1, position 0: RECV_ACT(s1,mb0<-d0): has no matching SEND_ACT(s0,mb0->d1) on device 0" in str(e.value)


def test_validate_reports_missing_compute():
    s = emit_schedule("1f1b", 1, 2)
    with pytest.raises(ScheduleError) as e:
        validate_schedule(replace_programs(s, [[Instr(Op.FWD, 0, 0), Instr(Op.BWD, 0, 0), Instr(Op.FWD, 0, 1)]]))
    assert "B(s0,mb1) is missing: device 0" in str(e.value)


def test_validate_rejects_backward_in_forward_only_and_wrong_peer():
    s = emit_schedule("forward", 1, 1, train=False)
    with pytest.raises(ScheduleError, match="forward-only"):
        validate_schedule(replace_programs(s, [[Instr(Op.FWD, 0, 0), Instr(Op.BWD, 0, 0)]]))
    s = emit_schedule("forward", 3, 1, train=False)
    progs = [list(p) for p in s.programs]
    progs[0][1] = Instr(Op.SEND_ACT, 0, 0, peer=2)
    with pytest.raises(ScheduleError, match=r"device 0, position 1: SEND_ACT\(s0,mb0->d2\): peer is device 2"):
        validate_schedule(replace_programs(s, progs))


def test_validate_reports_deadlock_with_each_blocked_device():
    s = emit_schedule("gpipe", 2, 1)
    d0 = [Instr(Op.RECV_GRAD, 0, 0, 1), Instr(Op.FWD, 0, 0), Instr(Op.SEND_ACT, 0, 0, 1), Instr(Op.BWD, 0, 0)]
    bad = replace_programs(s, [d0, list(s.programs[1])])
    with pytest.raises(ScheduleError) as e:
        validate_schedule(bad)
    msg = str(e.value)
    assert msg.startswith("deadlock")
    assert "device 0, position 0: RECV_GRAD(s0,mb0<-d1) waits for SEND_GRAD(s1,mb0->d0)" in msg
    assert "device 1, position 0: RECV_ACT(s1,mb0<-d0) waits for SEND_ACT(s0,mb0->d1)" in msg
    assert not independent_ok(bad)


def test_schedule_constructor_checks_shape():
    with pytest.raises(ScheduleError, match="stage_device"):
        Schedule("custom", 2, 1, (0,), ((), ()), True)
    with pytest.raises(ScheduleError, match="programs\\[0\\]\\[0\\] must be an Instr"):
        Schedule("custom", 1, 1, (0,), (("F(s0,mb0)",),), True)


# ---- properties over random pipelines -------------------------------------------------------


@st.composite
def schedules(draw):
    p = draw(st.integers(1, 6))
    m = draw(st.integers(1, 10))
    train = draw(st.booleans())
    kind = draw(st.sampled_from(["gpipe", "1f1b"] + ([] if train else ["forward"])))
    if draw(st.booleans()):
        sd = None
    else:
        sd = draw(st.lists(st.integers(0, p - 1), min_size=p, max_size=p))
    return emit_schedule(kind, p, m, stage_device=sd, train=train)


@FAST
@given(schedules())
def test_every_emitted_schedule_validates(s):
    validate_schedule(s)
    assert independent_ok(s)
    peaks = peak_inflight(s)
    if s.train and s.kind == "1f1b":
        assert peaks == tuple(min(s.num_stages - k, s.num_microbatches) for k in range(s.num_stages))
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def _positions(s: Schedule) -> list[tuple[int, int]]:
    return [(d, i) for d, prog in enumerate(s.programs) for i in range(len(prog))]


@FAST
@given(schedules(), st.data())
def test_dropping_an_instruction_is_caught(s, data):
    d, i = data.draw(st.sampled_from(_positions(s)))
    progs = [list(p) for p in s.programs]
    del progs[d][i]
    with pytest.raises(ScheduleError):
        validate_schedule(replace_programs(s, progs))


@FAST
@given(schedules(), st.data())
def test_duplicating_an_instruction_is_caught(s, data):
    d, i = data.draw(st.sampled_from(_positions(s)))
    progs = [list(p) for p in s.programs]
    j = data.draw(st.integers(0, len(progs[d])))
    progs[d].insert(j, progs[d][i])
    with pytest.raises(ScheduleError, match="duplicate"):
        validate_schedule(replace_programs(s, progs))


@FAST
@given(schedules(), st.data())
def test_moving_an_instruction_to_another_device_is_caught(s, data):
    if s.num_devices < 2:
        return
    d, i = data.draw(st.sampled_from(_positions(s)))
    other = data.draw(st.sampled_from([x for x in range(s.num_devices) if x != d]))
    progs = [list(p) for p in s.programs]
    ins = progs[d].pop(i)
    progs[other].insert(data.draw(st.integers(0, len(progs[other]))), ins)
    with pytest.raises(ScheduleError, match="runs on device"):
        validate_schedule(replace_programs(s, progs))


@FAST
@given(schedules(), st.data())
def test_swapping_adjacent_instructions_is_caught_or_harmless(s, data):
    candidates = [(d, i) for d, i in _positions(s) if i + 1 < len(s.programs[d])]
    if not candidates:
        return
    d, i = data.draw(st.sampled_from(candidates))
    progs = [list(p) for p in s.programs]
    progs[d][i], progs[d][i + 1] = progs[d][i + 1], progs[d][i]
    mutated = replace_programs(s, progs)
    try:
        validate_schedule(mutated)
    except ScheduleError:
        return
    assert independent_ok(mutated)


def test_some_swaps_are_caught_and_some_harmless():
    """Pin down both outcomes of the swap mutation on a known schedule."""
    s = emit_schedule("1f1b", 2, 2)
    progs = [list(p) for p in s.programs]
    progs[0][0], progs[0][1] = progs[0][1], progs[0][0]  # SEND_ACT before its F
    with pytest.raises(ScheduleError, match="needs F\\(s0,mb0\\) earlier"):
        validate_schedule(replace_programs(s, progs))
    progs = [list(p) for p in s.programs]
    progs[0][3], progs[0][4] = progs[0][4], progs[0][3]  # SEND_ACT(mb1) vs RECV_GRAD(mb0): independent
    validate_schedule(replace_programs(s, progs))
    progs = [list(p) for p in s.programs]
    # RECV_GRAD(mb0) before F(mb1)'s SEND: d1 needs mb1's activation only after sending mb0's grad
    progs[0] = progs[0][:2] + progs[0][4:5] + progs[0][2:4] + progs[0][5:]
    validate_schedule(replace_programs(s, progs))
