"""Planner surface (issue 3): cluster presets and node links, their files and errors, the
explanation of a plan (`inspect --why`) and the baseline comparison (`plan --baseline`)."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest
import torch

import fxpipe
from fxpipe.cli import main
from fxpipe.compiler.cluster import CUDA_PRESETS, Cluster, Device, NodeLink
from fxpipe.compiler.pipeline import _problem
from fxpipe.compiler.plan import Plan
from fxpipe.errors import PlanError
from fxpipe.passes.emit_schedule import emit_schedule, peak_inflight
from fxpipe.passes.explain_plan import baseline_stages, compare_baseline, explain, stage_memory_split
from fxpipe.passes.place_stages import place_stages

GiB = 1024**3


# ---- presets and node links -------------------------------------------------------------


def test_preset_prices_intra_and_inter_node_links():
    c = Cluster.preset("h100", 16, per_node=8)
    assert len(c) == 16 and c.devices[0].peak_flops == CUDA_PRESETS["h100"]["peak_flops"]
    assert [d.node for d in c.devices] == [0] * 8 + [1] * 8
    assert c.link(0, 7).bandwidth == 450e9 and c.link(0, 7).latency == 5e-6
    assert c.link(7, 8).bandwidth == 25e9 and c.link(8, 7).latency == 2e-5
    assert Cluster.preset("l4", 2).link(0, 1).bandwidth == 32e9
    assert Cluster.preset("A100", 2).link(0, 1).bandwidth == 300e9
    fast = Cluster.preset("h200", 4, per_node=2, inter_node_bandwidth=50e9, inter_node_latency=1e-5)
    assert fast.link(1, 2).bandwidth == 50e9 and fast.devices[0].memory == CUDA_PRESETS["h200"]["memory"]


def test_concat_mixes_an_h100_node_with_a100s():
    mixed = Cluster.concat(Cluster.preset("h100", 8), Cluster.preset("a100", 16, per_node=8), link=(12.5e9, 3e-5))
    assert [d.node for d in mixed.devices] == [0] * 8 + [1] * 8 + [2] * 8
    assert mixed.link(0, 1).bandwidth == 450e9
    assert mixed.link(8, 9).bandwidth == 300e9
    assert mixed.link(15, 16).bandwidth == 25e9  # a100 nodes keep their own network between them
    assert mixed.link(7, 8).bandwidth == 12.5e9 and mixed.link(0, 23).latency == 3e-5
    # a cluster without nodes joined by explicit device links
    plain = Cluster.concat(Cluster((Device("x", "cuda", 1e12, 1e11, GiB),)), Cluster.preset("l4", 1), link=(1e9, 0.0))
    assert plain.link(0, 1).bandwidth == 1e9


def test_subset_keeps_node_links():
    c = Cluster.preset("h100", 16, per_node=8)
    sub = c.subset([3, 12, 4])
    assert sub.link(0, 1).bandwidth == 25e9 and sub.link(0, 2).bandwidth == 450e9


def test_cluster_with_nodes_round_trips_and_old_files_load(tmp_path: Path):
    c = Cluster.concat(Cluster.preset("h100", 2), Cluster.preset("a100", 2))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(c.to_dict()))
    assert Cluster.load(path) == c
    # a file written before nodes existed: no "node", no "node_links"
    old = {"devices": [{"name": "g0", "kind": "cuda", "peak_flops": 1e12, "mem_bandwidth": 1e11, "memory": 1e9},
                       {"name": "g1", "kind": "cuda", "peak_flops": 1e12, "mem_bandwidth": 1e11, "memory": 1e9}],
           "links": [{"src": 0, "dst": 1, "bandwidth": 4.5e11, "latency": 1e-5}]}
    path.write_text(json.dumps(old))
    loaded = Cluster.load(path)
    assert loaded.devices[0].node == -1 and loaded.link(1, 0).bandwidth == 4.5e11
    back = loaded.to_dict()  # written back without the new fields, so older fxpipe reads it too
    assert "node_links" not in back and all("node" not in d for d in back["devices"])
    assert Cluster.from_dict(back) == loaded


def test_device_of_unknown_node_falls_back_to_the_kind_default():
    c = Cluster((Device("a", "cuda", 1e12, 1e11, GiB, node=0), Device("b", "cuda", 1e12, 1e11, GiB)),
                (), (NodeLink(0, 0, 1e11),))
    assert c.link(0, 1).bandwidth == 50e9


# ---- clear errors ------------------------------------------------------------------------


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(PlanError, match="unknown GPU preset 'v100'.*'h100', 'h200', 'a100', 'l4'"):
        Cluster.preset("v100", 8)
    with pytest.raises(PlanError, match="count must be a positive integer"):
        Cluster.preset("h100", 0)
    with pytest.raises(PlanError, match="per_node must be a positive integer"):
        Cluster.preset("h100", 8, per_node=0)


def _load(tmp_path: Path, data) -> Cluster:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data))
    return Cluster.load(path)


GPU = {"name": "g", "kind": "cuda", "peak_flops": 1e12, "mem_bandwidth": 1e11, "memory": 1e9, "node": 0}


def test_cluster_file_errors_name_the_field(tmp_path: Path):
    with pytest.raises(PlanError, match=r"devices\[0\] is missing memory"):
        _load(tmp_path, {"devices": [{k: v for k, v in GPU.items() if k != "memory"}]})
    with pytest.raises(PlanError, match=r"node_links\[0\] is missing bandwidth"):
        _load(tmp_path, {"devices": [GPU], "node_links": [{"src_node": 0, "dst_node": 0}]})
    with pytest.raises(PlanError, match=r"node_links\[0\].*bandwidth must be a positive number of bytes/s, got -1"):
        _load(tmp_path, {"devices": [GPU], "node_links": [{"src_node": 0, "dst_node": 0, "bandwidth": -1}]})
    with pytest.raises(PlanError, match=r"links\[0\].*bandwidth must be a positive number.*got -5"):
        _load(tmp_path, {"devices": [GPU, GPU], "links": [{"src": 0, "dst": 1, "bandwidth": -5}]})
    with pytest.raises(PlanError, match=r"devices\[0\].*node must be an integer >= 0 \(or -1 for unknown\)"):
        _load(tmp_path, {"devices": [{**GPU, "node": -3}]})
    with pytest.raises(PlanError, match=r"node_links\[0\] has unknown field\(s\) \['speed'\]"):
        _load(tmp_path, {"devices": [GPU], "node_links": [{"src_node": 0, "dst_node": 0, "bandwidth": 1, "speed": 2}]})
    with pytest.raises(PlanError, match="-1 \\(any node\\) must be used for both ends"):
        _load(tmp_path, {"devices": [GPU], "node_links": [{"src_node": -1, "dst_node": 0, "bandwidth": 1}]})
    with pytest.raises(PlanError, match="node link 0-0 is given twice"):
        _load(tmp_path, {"devices": [GPU], "node_links": [{"src_node": 0, "dst_node": 0, "bandwidth": 1}] * 2})


def _mlp(width: int = 64, depth: int = 8) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


def test_too_little_memory_in_total_says_how_many_devices_are_needed():
    x = torch.randn(8, 256)
    plan = fxpipe.plan(_mlp(256), ["cpu"] * 2, (x,))
    tiny = Cluster((Device("a", "cuda", 1e12, 1e11, 2**21, node=0), Device("b", "cuda", 1e12, 1e11, 2**21, node=0)),
                   (), (NodeLink(0, 0, 1e11),))
    sched = emit_schedule("1f1b", 2, 4)
    with pytest.raises(PlanError, match="(?s)no partition.*fits in memory.*use more devices \\(at least \\d+ of"):
        place_stages(lambda o: _problem(plan.costs, tiny.subset(o), (0, 1), peak_inflight(sched), True, "adam"), tiny)


# ---- placement with the pipeline's own problem ----------------------------------------------


def test_place_stages_with_the_pipelines_problem_puts_more_work_on_the_fast_device():
    x = torch.randn(8, 64)
    plan = fxpipe.plan(_mlp(), ["cpu"] * 2, (x,))
    slow = Device("slow", "cpu", 1e9, 1e9, GiB, node=0)
    fast = Device("fast", "cpu", 4e9, 4e9, GiB, node=0)
    cl = Cluster((slow, fast), (), (NodeLink(0, 0, 1e10),))
    inflight = peak_inflight(emit_schedule("1f1b", 2, 4))
    pl = place_stages(lambda o: _problem(plan.costs, cl.subset(o), (0, 1), inflight, True, "adam"), cl)
    assert pl.method == "exhaustive" and pl.candidates == 2
    work = {cl.devices[pl.order[j]].name: b - a for j, (a, b) in enumerate(pl.partition.bounds)}
    assert work["fast"] > work["slow"]


# ---- explain / --why / --baseline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("why")
    factory = d / "model.py"
    factory.write_text("import torch\n"
                       "def make():\n"
                       "    torch.manual_seed(0)\n"
                       "    layers = [torch.nn.Linear(64, 64) for _ in range(8)] + [torch.nn.Linear(64, 2000)]\n"
                       "    return torch.nn.Sequential(*layers), torch.randn(8, 64)\n")
    out = d / "plan.json"
    assert main(["plan", f"{factory}:make", "--devices", "cpu*3", "-o", str(out)]) == 0
    return out


def test_memory_split_adds_up_to_the_stage_memory(plan_file: Path):
    plan = fxpipe.Plan.load(plan_file)
    for s, st in enumerate(plan.stages):
        m = stage_memory_split(plan, s)
        assert m["total"] == pytest.approx(st.memory_bytes, rel=1e-12)
        assert m["grads"] == pytest.approx(m["params"])  # every parameter trains
        assert m["optimizer"] == pytest.approx(2 * m["params"])  # adam: two moments


def test_baseline_stages_reproduce_the_plans_own_stages(plan_file: Path):
    plan = fxpipe.Plan.load(plan_file)
    again = baseline_stages(plan, [st.units for st in plan.stages])
    for a, b in zip(again, plan.stages):
        assert a.fwd_ms == pytest.approx(b.fwd_ms) and a.send_ms == pytest.approx(b.send_ms)
        assert a.memory_bytes == pytest.approx(b.memory_bytes)
    assert fxpipe.simulate(plan.with_(stages=again)).step_time == pytest.approx(plan.predicted["step_ms"] / 1e3)


def test_explain_text(plan_file: Path):
    plan = fxpipe.Plan.load(plan_file)
    text = explain(plan)
    for words in ("compute ms", "transfer ms", "bubble ms", "<- bottleneck", "params", "grads", "optimizer",
                  "activations", "buffers", "transients", "uniform", "params", "step ms"):
        assert words in text
    assert len([l for l in text.splitlines() if l.strip().startswith(("0 ", "1 ", "2 "))]) == 6


def test_cli_inspect_why(plan_file: Path, capsys):
    assert main(["inspect", str(plan_file), "--why"]) == 0
    out = capsys.readouterr().out
    assert "why this plan" in out and "baselines" in out
    assert main(["inspect", str(plan_file), "--why", "--format", "trace"]) == 2
    assert "--why prints text" in capsys.readouterr().err


def test_cli_plan_with_baseline(plan_file: Path, tmp_path: Path, capsys):
    factory = plan_file.parent / "model.py"
    assert main(["plan", f"{factory}:make", "--devices", "cpu*3", "--baseline", "params",
                 "-o", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "baseline params: bottleneck" in out and "fxpipe: bottleneck" in out
    assert out.count("<- bottleneck") == 2
    plan = fxpipe.Plan.load(tmp_path / "p.json")
    with pytest.raises(PlanError, match="no baseline 'nope'"):
        compare_baseline(plan, "nope")


def test_plan_on_a_preset_cluster_saves_and_loads(tmp_path: Path):
    """A plan made for GPUs that do not exist here (offline), with node links in its cluster."""
    x = torch.randn(8, 64)
    c = Cluster.concat(Cluster.preset("h100", 1), Cluster.preset("a100", 1))
    plan = fxpipe.plan(_mlp(), c, (x,))
    plan.save(tmp_path / "p.json")
    again = fxpipe.Plan.load(tmp_path / "p.json")
    assert again == plan and again.cluster.link(0, 1).bandwidth == 25e9
    # placement may put either GPU first; the plan's cluster is the given one in stage order
    assert sorted(d.name for d in again.cluster.devices) == sorted(d.name for d in c.devices)
    assert again.cluster == c.subset(again.predicted["placement"]["order"])
    assert "why this plan" in explain(again)
    assert math.isfinite(again.predicted["step_ms"])


def test_explain_shows_placement_runner_ups(plan_file: Path):
    plan = fxpipe.Plan.load(plan_file)
    info = {"order": [2, 0, 1], "method": "exhaustive", "candidates": 6,
            "runner_ups": [{"order": [0, 1, 2], "bottleneck_ms": 9.5}], "lower_bound_ms": None}
    text = explain(plan.with_(predicted={**plan.predicted, "placement": info}))
    assert "placement (exhaustive, 6 device orders evaluated" in text and "runner-up [0, 1, 2]" in text


def test_interleaved_positions_are_placed_too():
    x = torch.randn(8, 64)
    plan = fxpipe.plan(_mlp(64, 16), ["cpu"] * 2, (x,))
    slow = Device("slow", "cpu", 1e9, 1e9, GiB, node=0)
    fast = Device("fast", "cpu", 4e9, 4e9, GiB, node=0)
    cl = Cluster((slow, fast), (), (NodeLink(0, 0, 1e10),))
    sd = (0, 1, 0, 1)
    sched = emit_schedule("interleaved", 4, 4, stage_device=sd)
    pl = place_stages(lambda o: _problem(plan.costs, cl.subset(o), sd, peak_inflight(sched), True, "adam"), cl)
    assert len(pl.partition.bounds) == 4 and pl.candidates == 2
    assert pl.to_dict()["order"] == list(pl.order)


@pytest.mark.parametrize("widths,m,devices", [
    ([64, 256, 64, 512, 32, 128, 256, 64, 96, 512, 64, 128], 2, 4),   # few microbatches: fill and drain weigh
    ([128] * 12, 4, 4),
    ([32, 512, 512, 32, 64, 64, 256, 32], 1, 3),                       # m = 1: the step is the sum
    ([256, 64, 64, 64, 64, 64, 64, 256, 64, 64], 8, 2),
])
def test_plan_step_is_never_worse_than_the_baselines(widths, m, devices):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths, widths[1:] + widths[:1]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    for schedule in ("gpipe", "1f1b"):
        plan = fxpipe.plan(model, ["cpu"] * devices, (torch.randn(8, widths[0]),), microbatches=m, schedule=schedule)
        step = plan.predicted["step_ms"]
        assert step == pytest.approx(fxpipe.simulate(plan).step_time * 1e3, rel=1e-12)
        for name, base in plan.baselines.items():
            if base["fits"]:
                stages = baseline_stages(plan, base["bounds"], base.get("recompute"))
                assert step <= fxpipe.simulate(plan.with_(stages=stages)).step_time * 1e3 * (1 + 1e-12), name


# ---- GPU presets named in a device list (offline planning) ------------------------------------


def test_preset_names_in_a_device_list_build_the_preset_cluster():
    c = Cluster.from_devices(["h100"] * 16 + ["a100"] * 8)
    ref = Cluster.concat(Cluster.preset("h100", 16), Cluster.preset("a100", 8))
    assert c.to_dict() == ref.to_dict()
    assert c.link(0, 7).bandwidth == 450e9 and c.link(7, 8).bandwidth == 25e9 and c.link(15, 16).bandwidth == 25e9
    assert Cluster.from_devices(["H100", "H100"], memory=40e9).devices[1].memory == 40e9


@pytest.mark.parametrize("devices, fragment", [
    (["h100", "cpu"], "mixed with GPU presets"),
    (["h100:3"], "names a kind of GPU, not one device"),
    (["b200"], "a GPU preset for offline planning ('h100'"),
])
def test_preset_mistakes_are_plan_errors(devices, fragment):
    with pytest.raises(PlanError, match=re.escape(fragment)):
        Cluster.from_devices(devices)


def test_cli_plans_for_preset_gpus_offline(tmp_path, capsys):
    from fxpipe.cli import main

    f = tmp_path / "m.py"
    f.write_text("import torch\n"
                 "def make():\n"
                 "    with torch.device('meta'):\n"
                 "        m = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])\n"
                 "    return m, torch.randn(16, 1024, device='meta')\n")
    out = tmp_path / "plan.json"
    assert main(["plan", f"{f}:make", "--devices", "h100*4", "-o", str(out)]) == 0
    plan = Plan.load(out)
    assert [d.name for d in plan.cluster.devices] == [f"h100:{k}" for k in range(4)]
    assert plan.cluster.devices[0].memory == Cluster.preset("h100", 1).devices[0].memory
