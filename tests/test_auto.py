"""Auto mode (issue 3): schedule="auto" / microbatches="auto" plan every candidate on one
capture and keep the fitting plan with the smallest predicted step; the candidates are in
plan.predicted["auto"], listed by `fxpipe inspect --why`; the CLI takes --schedule auto
--microbatches auto."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpipe
from fxpipe.cli import main
from fxpipe.compiler.cluster import Cluster
from fxpipe.compiler.plan import Plan
from fxpipe.errors import PlanError
from fxpipe.passes.explain_plan import explain

ORDER = {"gpipe": 0, "1f1b": 1, "interleaved": 2, "zb-h1": 3}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(6)])


def _best(rows: list[dict]) -> dict:
    fit = [r for r in rows if r["fits"]]
    return min(fit, key=lambda r: (round(r["step_ms"], 9), r["microbatches"], ORDER[r["schedule"]]))


def test_auto_picks_the_fastest_fitting_candidate_and_its_rows_are_real_plans():
    model, x = _model(), torch.randn(16, 64)
    plan = fxpipe.plan(model, ["cpu"] * 2, (x,), schedule="auto", microbatches="auto")
    rows = plan.predicted["auto"]
    assert {(r["schedule"], r["microbatches"]) for r in rows} == {
        (s, m) for s in ORDER for m in (1, 2, 4, 8, 16)}  # 32 > batch 16 is not tried
    best = _best(rows)
    assert (plan.schedule.kind, plan.microbatches) == (best["schedule"], best["microbatches"])
    assert plan.predicted["step_ms"] == best["step_ms"]
    assert all(plan.predicted["step_ms"] <= r["step_ms"] for r in rows if r["fits"])
    # each planned row is what planning that candidate by hand predicts; a skipped one would
    # have been slower, as its lower bound said
    assert any(r.get("skipped") for r in rows) and any(r["fits"] for r in rows)
    for r in rows:
        alone = fxpipe.plan(model, ["cpu"] * 2, (x,), schedule=r["schedule"], microbatches=r["microbatches"])
        if r.get("skipped"):
            assert r["lower_bound_ms"] > plan.predicted["step_ms"]
            assert alone.predicted["step_ms"] >= r["lower_bound_ms"] * (1 - 1e-9)
        elif (r["schedule"], r["microbatches"]) == (plan.schedule.kind, plan.microbatches):
            assert alone.predicted["step_ms"] == pytest.approx(r["step_ms"], rel=1e-12)
        else:  # auto refines only its best few cuts (AUTO_REFINE); by hand every cut is refined
            assert alone.predicted["step_ms"] <= r["step_ms"] * (1 + 1e-12)
    # the summary names the choice
    assert f"auto: chose schedule {plan.schedule.kind} with {plan.microbatches} microbatch{'es' if plan.microbatches != 1 else ''}" in plan.summary()


def test_auto_microbatches_only_with_a_fixed_schedule():
    model, x = _model(), torch.randn(3, 64)
    plan = fxpipe.plan(model, ["cpu"] * 2, (x,), schedule="gpipe", microbatches="auto")
    assert [(r["schedule"], r["microbatches"]) for r in plan.predicted["auto"]] == [("gpipe", 1), ("gpipe", 2)]
    assert plan.schedule.kind == "gpipe" and plan.microbatches == _best(plan.predicted["auto"])["microbatches"]
    fixed_m = fxpipe.plan(model, ["cpu"] * 2, (x,), schedule="auto", microbatches=2)
    assert {r["microbatches"] for r in fixed_m.predicted["auto"]} == {2}


def test_auto_under_memory_pressure_skips_what_does_not_fit():
    model, x = _model(), torch.randn(32, 64)
    free = fxpipe.plan(model, ["cpu"] * 2, (x,), schedule="auto", microbatches="auto", recompute=False)
    # memory where GPipe with 32 microbatches (every microbatch in flight) cannot fit
    g32 = fxpipe.plan(model, ["cpu"] * 2, (x,), schedule="gpipe", microbatches=32, recompute=False)
    f32 = fxpipe.plan(model, ["cpu"] * 2, (x,), schedule="1f1b", microbatches=32, recompute=False)
    cap = (max(s.memory_bytes for s in f32.stages) + min(s.memory_bytes for s in g32.stages)) / 2
    assert max(s.memory_bytes for s in f32.stages) < cap < min(s.memory_bytes for s in g32.stages)
    plan = fxpipe.plan(model, Cluster.from_devices(["cpu"] * 2, memory=cap), (x,), schedule="auto",
                       microbatches="auto", recompute=False)
    rows = {(r["schedule"], r["microbatches"]): r for r in plan.predicted["auto"]}
    g = rows[("gpipe", 32)]  # planned and found too big, or skipped by its lower bound
    assert not g["fits"] and ("fits in memory" in g["why"] or g["skipped"])
    with pytest.raises(PlanError, match="fits in memory"):
        fxpipe.plan(model, Cluster.from_devices(["cpu"] * 2, memory=cap), (x,), schedule="gpipe", microbatches=32,
                    recompute=False)
    assert rows[("1f1b", 32)]["fits"] or rows[("1f1b", 32)]["skipped"]
    assert all(s.memory_bytes <= cap for s in plan.stages)
    assert (plan.schedule.kind, plan.microbatches) == (_best(plan.predicted["auto"])["schedule"],
                                                       _best(plan.predicted["auto"])["microbatches"])
    assert len(free.predicted["auto"]) == len(plan.predicted["auto"])


def test_auto_with_nothing_that_fits_names_the_closest_candidate():
    model, x = _model(), torch.randn(8, 64)
    with pytest.raises(PlanError) as e:
        fxpipe.plan(model, Cluster.from_devices(["cpu"] * 2, memory=50_000), (x,), schedule="auto",
                    microbatches="auto")
    text = str(e.value)
    assert "no candidate of auto mode fits" in text and "the closest is schedule=" in text
    assert "To make it fit" in text


def test_auto_plan_round_trips_and_inspect_why_lists_the_runner_ups(tmp_path: Path, capsys):
    factory = tmp_path / "model.py"
    factory.write_text("import torch\n"
                       "def make():\n"
                       "    torch.manual_seed(0)\n"
                       "    layers = [torch.nn.Linear(32, 32) for _ in range(8)]\n"
                       "    return torch.nn.Sequential(*layers), torch.randn(8, 32)\n")
    out = tmp_path / "plan.json"
    assert main(["plan", f"{factory}:make", "--devices", "cpu*2", "--schedule", "auto", "--microbatches", "auto",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = Plan.load(out)
    assert f"auto: chose schedule {plan.schedule.kind} with {plan.microbatches} microbatch{'es' if plan.microbatches != 1 else ''}" in printed
    assert len(plan.predicted["auto"]) == 4 * 4  # 4 schedules x m in 1, 2, 4, 8
    assert main(["inspect", str(out), "--why"]) == 0
    why = capsys.readouterr().out
    assert "auto mode: 16 (schedule, microbatches) candidates" in why
    # every other candidate planned (runner-up) or skipped by its lower bound, by name
    assert why.count("runner-up") + why.count("  skipped  ") == 15 and why.count("chosen") >= 1
    assert explain(plan) in why
    # a damaged candidate list is refused naming the field
    data = json.loads(out.read_text())
    data["predicted"]["auto"][0]["microbatches"] = 0
    out.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"predicted\.auto\[0\]\.microbatches"):
        Plan.load(out)


def test_cli_refuses_a_bad_microbatches_value(tmp_path: Path, capsys):
    assert main(["plan", "x.py:make", "--devices", "cpu*2", "--microbatches", "many"]) == 2
    assert "integer or 'auto'" in capsys.readouterr().err


def test_auto_refusals():
    model, x = _model(), torch.randn(8, 64)
    with pytest.raises(PlanError, match="virtual_stages cannot be given with schedule='auto'"):
        fxpipe.plan(model, ["cpu"] * 2, (x,), schedule="auto", virtual_stages=2)
    with pytest.raises(PlanError, match="'auto'"):
        fxpipe.plan(model, ["cpu"] * 2, (x,), microbatches="several")


def test_compiled_auto_plan_trains_like_eager():
    model = _model()
    ref = copy.deepcopy(model)
    x, t = torch.randn(8, 64), torch.randn(8, 64)
    cm = fxpipe.compile(model, ["cpu"] * 2, (x,), schedule="auto", microbatches="auto")
    assert cm.plan.predicted["auto"]
    loss = cm.step(x, target=t, loss_fn=F.mse_loss)
    expected = F.mse_loss(ref(x), t)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-6)
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
