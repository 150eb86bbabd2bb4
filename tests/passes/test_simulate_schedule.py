"""Timed simulation against pipeline theory, the Chrome trace and the text timeline."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpipe.errors import ScheduleError
from fxpipe.passes.emit_schedule import Instr, Op, Schedule, emit_schedule
from fxpipe.passes.render_timeline import BWD_SYMBOLS, FWD_SYMBOLS, render_timeline
from fxpipe.passes.simulate_schedule import Event, Timeline, simulate_schedule

FAST = settings(derandomize=True, deadline=None, max_examples=40)


def compute_spans(tl: Timeline, device: int) -> list[tuple[str, float, float]]:
    return [(str(e.instr), e.start, e.end) for e in tl.events if e.device == device and e.lane == "compute"
            and e.instr.op in (Op.FWD, Op.BWD)]


# ---- theory: equal stages, no communication ------------------------------------------------


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 4, 8, 16, 32])
@pytest.mark.parametrize("tf, tb", [(1.0, 2.0), (0.003, 0.003)])
def test_bubble_matches_theory(kind, p, m, tf, tb):
    tl = simulate_schedule(emit_schedule(kind, p, m), [tf] * p, [tb] * p, [0.0] * p)
    assert tl.step_time == pytest.approx((m + p - 1) * (tf + tb), abs=1e-9)
    for d in range(p):
        assert abs(tl.bubble_fraction[d] - (p - 1) / (m + p - 1)) < 1e-9
        assert abs(tl.busy[d] - m * (tf + tb)) < 1e-9


@pytest.mark.parametrize("p, m", [(2, 3), (4, 8), (8, 32)])
def test_forward_only_step(p, m):
    tl = simulate_schedule(emit_schedule("forward", p, m, train=False), [1.0] * p, [9.0] * p, [0.0] * p)
    assert tl.step_time == pytest.approx((m + p - 1) * 1.0, abs=1e-9)
    assert tl.peak_inflight == (1,) * p


# ---- exact timelines ------------------------------------------------------------------------


def test_1f1b_p2_m2_exact_timeline():
    tl = simulate_schedule(emit_schedule("1f1b", 2, 2), [1.0, 1.0], [2.0, 2.0], [0.0, 0.0])
    assert compute_spans(tl, 0) == [
        ("F(s0,mb0)", 0.0, 1.0), ("F(s0,mb1)", 1.0, 2.0), ("B(s0,mb0)", 4.0, 6.0), ("B(s0,mb1)", 7.0, 9.0),
    ]
    assert compute_spans(tl, 1) == [
        ("F(s1,mb0)", 1.0, 2.0), ("B(s1,mb0)", 2.0, 4.0), ("F(s1,mb1)", 4.0, 5.0), ("B(s1,mb1)", 5.0, 7.0),
    ]
    assert tl.step_time == 9.0
    assert tl.busy == (6.0, 6.0)
    assert tl.peak_inflight == (2, 1)
    # every instruction gives exactly one event
    assert sorted(str(e.instr) for e in tl.events) == sorted(
        str(i) for prog in emit_schedule("1f1b", 2, 2).programs for i in prog
    )


def test_communication_adds_to_the_critical_path():
    # F0 [0,1], act transfer [1,1.5], F1 [1.5,2.5], B1 [2.5,3.5], grad [3.5,4], B0 [4,5]
    tl = simulate_schedule(emit_schedule("gpipe", 2, 1), [1.0, 1.0], [1.0, 1.0], [0.5, 0.0])
    assert tl.step_time == pytest.approx(5.0)
    send = [e for e in tl.events if e.instr.op is Op.SEND_ACT][0]
    assert (send.device, send.lane, send.start, send.end) == (0, "comm", 1.0, 1.5)
    recv = [e for e in tl.events if e.instr.op is Op.RECV_ACT][0]
    assert (recv.device, recv.lane, recv.start, recv.end) == (1, "compute", 0.0, 1.5)
    assert tl.bubble_fraction == pytest.approx((0.6, 0.6))


def test_transfers_on_one_link_are_serialised_and_the_sender_does_not_wait():
    tl = simulate_schedule(emit_schedule("forward", 2, 2, train=False), [0.1, 0.1], [0.0, 0.0], [1.0])
    sends = [e for e in tl.events if e.instr.op is Op.SEND_ACT]
    assert [(e.start, e.end) for e in sends] == [pytest.approx((0.1, 1.1)), pytest.approx((1.1, 2.1))]
    # device 0 ran F(mb1) right after F(mb0): SEND does not block
    assert compute_spans(tl, 0)[1][1:] == pytest.approx((0.1, 0.2))
    assert compute_spans(tl, 1) == [("F(s1,mb0)", pytest.approx(1.1), pytest.approx(1.2)),
                                    ("F(s1,mb1)", pytest.approx(2.1), pytest.approx(2.2))]
    assert tl.step_time == pytest.approx(2.2)


def test_stages_on_one_device_hand_over_in_zero_time():
    s = emit_schedule("gpipe", 2, 4, stage_device=[0, 0])
    tl = simulate_schedule(s, [1.0, 2.0], [3.0, 4.0], [100.0, 100.0])
    assert tl.step_time == pytest.approx(4 * (1 + 2 + 3 + 4))
    assert tl.bubble_fraction == (0.0,)
    assert tl.peak_inflight == (8,)


def test_peak_inflight_per_device():
    tl = simulate_schedule(emit_schedule("1f1b", 4, 8), [1.0] * 4, [1.0] * 4, [0.0] * 4)
    assert tl.peak_inflight == (4, 3, 2, 1)
    tl = simulate_schedule(emit_schedule("gpipe", 4, 8), [1.0] * 4, [1.0] * 4, [0.0] * 4)
    assert tl.peak_inflight == (8, 8, 8, 8)


def test_slow_stage_sets_the_pace():
    # steady state is bound by the slowest stage: step >= m * (tf+tb) of stage 1
    tl = simulate_schedule(emit_schedule("1f1b", 3, 16), [1.0, 3.0, 1.0], [1.0, 3.0, 1.0], [0.0] * 3)
    assert tl.step_time >= 16 * 6.0
    assert tl.bubble_fraction[1] == min(tl.bubble_fraction)


# ---- input checks ---------------------------------------------------------------------------


def test_bad_costs_and_schedules_raise():
    s = emit_schedule("1f1b", 2, 2)
    with pytest.raises(ScheduleError, match="fwd_time has 1 entries"):
        simulate_schedule(s, [1.0], [1.0, 1.0], [0.0])
    with pytest.raises(ScheduleError, match=r"bwd_time\[1\]"):
        simulate_schedule(s, [1.0, 1.0], [1.0, -1.0], [0.0])
    with pytest.raises(ScheduleError, match="comm_time"):
        simulate_schedule(s, [1.0, 1.0], [1.0, 1.0], [0.0, 0.0, 0.0])
    broken = Schedule(s.kind, 2, 2, s.stage_device, (s.programs[0][1:], s.programs[1]), True)
    with pytest.raises(ScheduleError):
        simulate_schedule(broken, [1.0, 1.0], [1.0, 1.0], [0.0])


# ---- Chrome trace ---------------------------------------------------------------------------


def test_chrome_trace():
    tl = simulate_schedule(emit_schedule("1f1b", 2, 2), [1e-3, 1e-3], [2e-3, 2e-3], [5e-4, 5e-4])
    trace = json.loads(json.dumps(tl.to_chrome_trace()))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    f = [e for e in xs if e["name"] == "F s1 mb0"]
    assert len(f) == 1
    assert (f[0]["pid"], f[0]["tid"]) == (1, 0)
    assert f[0]["ts"] == pytest.approx(1500.0) and f[0]["dur"] == pytest.approx(1000.0)
    sends = [e for e in xs if e["name"].startswith("SEND_ACT s0 mb0")]
    assert sends[0]["tid"] == 1 and sends[0]["dur"] == pytest.approx(500.0)
    assert {e["pid"] for e in xs} == {0, 1}
    names = {(e["pid"], e["args"]["name"]) for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {(0, "device 0"), (1, "device 1")}
    n_compute = sum(1 for e in xs if e["name"][0] in "FB" and e["name"][1] == " ")
    assert n_compute == 8


# ---- text timeline --------------------------------------------------------------------------


def test_render_small_exact():
    tl = simulate_schedule(emit_schedule("1f1b", 2, 2), [1e-3] * 2, [2e-3] * 2, [0.0] * 2)
    lines = render_timeline(tl, width=40).splitlines()
    assert lines[1] == "d0 |00001111........aaaaaaa....bbbbbbbb|"
    assert lines[2] == "d1 |....0000aaaaaaaa111bbbbbbbb........|"
    assert lines[-1] == "step 9 ms; bubble: d0 33.3%, d1 33.3%"
    assert all(len(line) <= 40 for line in lines)


def test_render_names_and_symbols():
    p, m = 8, 32
    tl = simulate_schedule(emit_schedule("gpipe", p, m), [1e-3] * p, [2e-3] * p, [0.0] * p)
    names = [f"gpu{d}" for d in range(p)]
    text = render_timeline(tl, width=200, device_names=names)
    rows = text.splitlines()[1 : 1 + p]
    assert [r.split(" |")[0].strip() for r in rows] == names
    # wide enough: every forward and backward microbatch symbol shows on device 0
    assert set(FWD_SYMBOLS[mb % len(FWD_SYMBOLS)] for mb in range(m)) <= set(rows[0])
    assert set(BWD_SYMBOLS[mb % len(BWD_SYMBOLS)] for mb in range(m)) <= set(rows[0])
    assert "bubble" in text and "gpu7 17.9%" in text.replace("\n", " ")


def test_render_crowded_columns_use_generic_marks():
    # 32 microbatches of 1 us each in a 20-column chart: many per column
    tl = simulate_schedule(emit_schedule("gpipe", 1, 32), [1e-6], [1e-6], [0.0])
    row = render_timeline(tl, width=25).splitlines()[1]
    cells = row.split("|")[1]
    assert set(cells) == {"F", "B"}
    assert cells == "F" * (len(cells) // 2) + "B" * (len(cells) // 2)


def test_render_rejects_bad_arguments():
    tl = simulate_schedule(emit_schedule("1f1b", 2, 2), [1.0] * 2, [1.0] * 2, [0.0] * 2)
    with pytest.raises(ScheduleError, match="device_names"):
        render_timeline(tl, device_names=["a"])
    with pytest.raises(ScheduleError, match="width"):
        render_timeline(tl, width=5)


@FAST
@given(
    kind=st.sampled_from(["gpipe", "1f1b"]),
    p=st.integers(1, 8),
    m=st.integers(1, 32),
    width=st.integers(14, 160),
    comm=st.sampled_from([0.0, 0.2, 3.0]),
    long_names=st.booleans(),
)
def test_render_lines_fit_width(kind, p, m, width, comm, long_names):
    tl = simulate_schedule(emit_schedule(kind, p, m), [1.0 + s % 3 for s in range(p)], [2.0] * p, [comm] * p)
    names = [f"a-very-long-device-name-{d}" for d in range(p)] if long_names else None
    text = render_timeline(tl, width=width, device_names=names)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    assert len([line for line in lines if "|" in line]) == p  # rows only; footer uses no '|'
    assert all(line.endswith("|") for line in lines if "|" in line)
    assert "step" in text


def test_render_zero_time_timeline():
    tl = simulate_schedule(emit_schedule("1f1b", 2, 2), [0.0] * 2, [0.0] * 2, [0.0] * 2)
    assert tl.step_time == 0.0 and tl.bubble_fraction == (0.0, 0.0)
    rows = render_timeline(tl, width=30).splitlines()[1:3]
    assert all(set(r.split("|")[1]) == {"."} for r in rows)


def test_event_is_plain_data():
    e = Event(0, Instr(Op.FWD, 0, 0), 1.0, 3.0, "compute")
    assert e.duration == 2.0
