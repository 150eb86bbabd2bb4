"""Hand-written schedules from JSON and CSV: round trips, inferred fields, located errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxpipe.errors import ScheduleError
from fxpipe.passes.emit_schedule import Op, emit_schedule
from fxpipe.passes.load_schedule import load_schedule


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def compute_programs(s) -> list[list[str]]:
    return [[str(i) for i in prog if i.peer == -1] for prog in s.programs]


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s",
    [
        emit_schedule("1f1b", 3, 4),
        emit_schedule("zb-h1", 3, 4),
        emit_schedule("interleaved", 4, 4, num_devices=2),
        emit_schedule("forward", 2, 3, train=False),
    ],
)
def test_to_dict_json_round_trip(tmp_path, s):
    assert load_schedule(write(tmp_path, "s.json", json.dumps(s.to_dict(), indent=1))) == s


@given(kind=st.sampled_from(["gpipe", "1f1b", "zb-h1", "interleaved"]), p=st.integers(1, 4), m=st.integers(1, 6),
       literal=st.booleans(), fmt=st.sampled_from(["json", "csv-wide", "csv-long"]))
def test_short_forms_rebuild_the_emitted_schedule(tmp_path_factory, kind, p, m, literal, fmt):
    n = 2 * p if kind == "interleaved" else p
    s = emit_schedule(kind, n, m, num_devices=p)
    # literal: every instruction written out; else compute only, messages added by the loader
    progs = [[str(i) for i in prog] for prog in s.programs] if literal else compute_programs(s)
    tmp = tmp_path_factory.mktemp("ls")
    if fmt == "json":
        path = write(tmp, "s.json", json.dumps({"stage_device": list(s.stage_device), "num_microbatches": m,
                                                "programs": progs}))
    elif fmt == "csv-wide":
        path = write(tmp, "s.csv", "device,instructions\n" + "".join(
            f"d{d}," + ",".join(prog) + "\n" for d, prog in enumerate(progs)))
    else:
        path = write(tmp, "s.csv", "".join(f"{d},\"{ins}\"\n" for d, prog in enumerate(progs) for ins in prog))
    got = load_schedule(path)
    assert got.kind == "custom"
    assert (got.num_stages, got.num_microbatches, got.stage_device, got.train, got.programs) == (
        s.num_stages, s.num_microbatches, s.stage_device, s.train, s.programs)


def test_csv_rows_append_and_comments_are_skipped(tmp_path):
    text = """# two stages, split backward
device,instruction
d0,F(s0,mb0),BI(s0,mb0)
d1,F(s1,mb0),BI(s1,mb0),BW(s1,mb0)

0,BW(s0,mb0)
"""
    s = load_schedule(write(tmp_path, "s.csv", text))
    assert s.listing() == (
        "d0: F(s0,mb0) SEND_ACT(s0,mb0->d1) RECV_GRAD(s0,mb0<-d1) BI(s0,mb0) BW(s0,mb0)\n"
        "d1: RECV_ACT(s1,mb0<-d0) F(s1,mb0) BI(s1,mb0) SEND_GRAD(s1,mb0->d0) BW(s1,mb0)"
    )
    assert s.train and s.stage_device == (0, 1) and s.num_microbatches == 1


def test_json_short_form_options(tmp_path):
    d = {"stage_device": [0], "num_microbatches": 2, "programs": [["F(s0,mb0)", "F(s0,mb1)"]], "kind": "mine"}
    s = load_schedule(write(tmp_path, "s.json", json.dumps(d)))
    assert s.kind == "mine" and not s.train  # no backward: inferred forward-only
    d["train"] = True
    with pytest.raises(ScheduleError, match=r"B\(s0,mb0\) is missing"):
        load_schedule(write(tmp_path, "s.json", json.dumps(d)))


# ---- errors name the file, the line and the instruction -------------------------------------


def test_bad_instruction_in_json_names_line(tmp_path):
    text = '{"stage_device": [0, 1],\n "num_microbatches": 1,\n "programs": [\n  ["F(s0,mb0)", "B(s0,mb0)"],\n' \
           '  ["F(s1,mb0)",\n   "B(s1,mb 0)"]]}\n'
    path = write(tmp_path, "bad.json", text)
    with pytest.raises(ScheduleError) as e:
        load_schedule(path)
    assert str(e.value).startswith(f"{path}:6: instruction 'B(s1,mb 0)'")


def test_invalid_schedule_in_json_names_line_and_instruction(tmp_path):
    text = json.dumps({"stage_device": [0, 1], "num_microbatches": 2,
                       "programs": [["F(s0,mb0)", "F(s0,mb1)", "B(s0,mb0)", "B(s0,mb1)"],
                                    ["F(s1,mb0)", "B(s1,mb1)", "F(s1,mb1)", "B(s1,mb0)"]]}, indent=1)
    path = write(tmp_path, "bad.json", text)
    line = [i for i, t in enumerate(text.splitlines(), 1) if '"B(s1,mb1)"' in t][0]
    with pytest.raises(ScheduleError) as e:
        load_schedule(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: instruction 'B(s1,mb1)'") and "needs F(s1,mb1) earlier" in msg


def test_invalid_schedule_in_csv_names_line(tmp_path):
    text = "0,F(s0,mb0),BW(s0,mb0),BI(s0,mb0)\n"
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(ScheduleError, match=r"bad.csv:1: instruction 'BW\(s0,mb0\)': .*needs BI\(s0,mb0\) earlier"):
        load_schedule(path)


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("s.json", '{"stage_device": [0],\n "programs": [[]]\n,}', "s.json:3: not valid JSON"),
        ("s.json", "[1, 2]", "holds a JSON object"),
        ("s.json", '{"stage_device": [0], "programs": [[]]}', "missing field(s) ['num_microbatches']"),
        ("s.json", '{"stage_device": [0], "num_microbatches": 1, "programs": [["F(s0,mb0)"]],\n "colour": 1}',
         "s.json:2: unknown field(s) ['colour']"),
        ("s.json", '{"stage_device": [0],\n "num_microbatches": 0, "programs": [["F(s0,mb0)"]]}',
         "s.json:2: 'num_microbatches' must be an int >= 1"),
        ("s.json", '{"stage_device": [0], "num_microbatches": 1, "programs": [["F(s0,mb0)", "F(s0,mb3)"]]}',
         "instruction 'F(s0,mb3)': microbatch 3 does not exist"),
        ("s.json", '{"stage_device": [0], "num_microbatches": 1, "programs": [[], ["F(s0,mb0)"]]}',
         "stage 0 runs on device 0, not device 1"),
        ("s.json", '{"format": "fxpipe.schedule", "version": 1, "kind": "1f1b", "num_stages": 1,\n'
                   ' "num_microbatches": 1, "stage_device": [0], "train": false,\n "programs": [["G(s0,mb0)"]]}',
         "s.json:3: instruction 'G(s0,mb0)'"),
        ("s.csv", "0,F(s0,mb0)\nx,F(s0,mb0)\n", "s.csv:2: first cell 'x' is not a device"),
        ("s.csv", "0,F(s0,mb0)\n1,F(s0,mb1)\n", "s.csv:2: instruction 'F(s0,mb1)': stage 0 is already on device 0"),
        ("s.csv", "0,F(s0,mb0)\n1,F(s2,mb0)\n", "stage(s) [1] have no instructions"),
        ("s.csv", "0,F(s0,mb0)\n0,F(s0,mb0)\n", "s.csv:2: instruction 'F(s0,mb0)': device 0, position 1: F(s0,mb0): "
                                               "duplicate"),
        ("s.csv", "# nothing\n", "no instructions"),
        ("s.txt", "0,F(s0,mb0)\n", "unknown schedule file type '.txt'"),
    ],
)
def test_errors(tmp_path, name, text, fragment):
    with pytest.raises(ScheduleError) as e:
        load_schedule(write(tmp_path, name, text))
    assert fragment in str(e.value)
    assert str(tmp_path / name) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ScheduleError, match="no such schedule file"):
        load_schedule(tmp_path / "nope.json")


def test_compute_only_split_backward_gets_send_after_bi(tmp_path):
    s = load_schedule(write(tmp_path, "s.csv", "0,F(s0,mb0),BI(s0,mb0),BW(s0,mb0)\n1,F(s1,mb0),BI(s1,mb0),BW(s1,mb0)\n"))
    d1 = [str(i) for i in s.programs[1]]
    assert d1.index("SEND_GRAD(s1,mb0->d0)") == d1.index("BI(s1,mb0)") + 1
    assert any(i.op is Op.BWD_WEIGHT for i in s.programs[0])


def test_csv_two_stages_on_one_device(tmp_path):
    s = load_schedule(write(tmp_path, "s.csv", "0,F(s0,mb0),F(s1,mb0),B(s1,mb0),B(s0,mb0)\n"))
    assert s.stage_device == (0, 0) and s.num_devices == 1
    assert [str(i) for i in s.programs[0]][:3] == ["F(s0,mb0)", "SEND_ACT(s0,mb0->d0)", "RECV_ACT(s1,mb0<-d0)"]
