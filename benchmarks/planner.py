"""The planner: speed on a 70B-shaped problem, exactness, quality against baselines, memory.

(a) **Speed.** Placement + partition of a synthetic Llama-2-70B-shaped decoder (80 layers,
    hidden 8192, FFN 28672, 64 heads / 8 KV heads, vocab 32000, sequence 4096, microbatch 1,
    bf16) onto `Cluster.preset("h100", 64, per_node=8)` (and a mixed H100 + A100 cluster).
    The `PartitionProblem` is built directly from per-layer costs by formula (no model
    capture; that is the rest of issue 3): forward FLOPs per layer
    ``2s(2h^2 + 2h*h_kv) + 4s^2h + 6s*h*ffn``, backward 2x, parameters in bf16 with bf16
    gradients and fp32 Adam state + master weights (16 bytes per parameter), saved
    activations ``34*s*h`` bytes per layer (Megatron's estimate with flash attention),
    boundary ``s*h*2`` bytes, 1F1B with m microbatches (in flight ``min(p - j, m)``).
(a2) **End to end.** `fxpipe.plan` of the real thing: transformers' `LlamaForCausalLM` with
    the Llama-2-70B config built on the meta device, batch 8 x seq 2048 (meta), onto 64 H100s
    (8 per node), 1F1B, 8 microbatches: wall time per phase (capture, shapes, units+costs,
    schedule, partition+placement, simulate) and in total, target < 10 s with partition +
    placement < 1 s. Capture uses the repeat path (2 of 80 decoder layers traced by
    torch.export, the rest copied); a reference row captures all 80 layers (`capture_method=
    "export"`) and checks both plans have the same graph fingerprint. Also the built-in
    hand-written `TinyGPT` at the same size (fx path). The machine is shared: each row records
    the 1-minute load average and the process CPU time beside the wall time.
(a3) **Auto mode at scale.** `fxpipe.plan(schedule="auto", microbatches="auto")` of
    transformers' `LlamaForCausalLM` with the Llama-2-7B config on meta, batch 64 x seq 2048,
    onto 64 H100s: every candidate planned (`AUTO_PRUNE = False`) against candidates planned in
    the order of their step's lower bound, skipping those that cannot win (the default); the
    choice must be the same.
(b) **Exactness.** Random small instances (<= 12 units, <= 4 devices, unequal speeds,
    memory and links in two nodes): `place_stages`' bottleneck equals brute force over all
    device orders x all contiguous partitions.
(c) **Quality.** Small `transformers` models (GPT-2, BERT, ViT, Llama, and a ResNet-style
    CNN with 4 stages of 2 basic blocks; random init, 8 layers) planned for real with `fxpipe.plan` on k = 2, 4, 8 CPU workers: fxpipe's
    bottleneck against the uniform-layer and equal-parameter baselines (identical CPU workers,
    so placement has nothing to choose). Then the same cost tables on a heterogeneous cluster
    (two fast and two slow devices listed interleaved across two nodes): the exact partition
    in the given order, fxpipe's placement + partition, and the baselines in the given order.
(d) **Memory.** GPT-2 on 4 workers whose memory is set between fxpipe's need and the
    uniform split's: the uniform split does not fit, fxpipe's does (a real `fxpipe.plan`).
    (d2) memory below what any split needs without recomputation: recompute=False is
    refused, recompute="auto" fits by recomputing only the stages that need it.

    python3 benchmarks/planner.py            # writes benchmarks/results/planner.{json,md}
    python3 benchmarks/planner.py --quick    # fewer instances and models
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxpipe  # noqa: E402
from fxpipe.compiler.cluster import Cluster, Device, NodeLink  # noqa: E402
from fxpipe.compiler.pipeline import _problem  # noqa: E402
from fxpipe.passes.emit_schedule import emit_schedule, peak_inflight  # noqa: E402
from fxpipe.passes.partition_stages import (PartitionProblem, all_partitions, params_partition,  # noqa: E402
                                            partition_stages, uniform_partition)
from fxpipe.passes.place_stages import place_stages  # noqa: E402

GiB = 1024**3


@dataclass
class Config:
    # (a) 70B-shaped decoder
    layers: int = 80
    hidden: int = 8192
    ffn: int = 28672
    heads: int = 64
    kv_heads: int = 8
    vocab: int = 32000
    seq: int = 4096
    microbatch: int = 1
    microbatches: int = 8
    gpus: int = 64
    per_node: int = 8
    repeats: int = 3
    # (a2) end to end on the meta device
    e2e_batch: int = 8
    e2e_seq: int = 2048
    e2e_full_capture: bool = True  # the reference row that captures every layer (~35 s)
    # (a3) auto mode, Llama-2-7B shape
    auto_layers: int = 32
    auto_hidden: int = 4096
    auto_ffn: int = 11008
    auto_heads: int = 32
    auto_batch: int = 64
    auto_seq: int = 2048
    # (b) exactness

    instances: int = 200
    seed: int = 0
    # (c) quality
    models: tuple[str, ...] = ("gpt2", "bert", "vit", "llama", "resnet")
    device_counts: tuple[int, ...] = (2, 4, 8)
    small_layers: int = 8
    small_hidden: int = 128
    small_vocab: int = 8192
    small_seq: int = 64
    small_batch: int = 8
    small_microbatches: int = 4
    hetero_speedup: float = 4.0  # fast devices are this much faster than slow ones
    out: str = "benchmarks/results/planner"


# ------------------------------------------------------------------------------------ (a)


LLAMA_13B = dict(layers=40, hidden=5120, ffn=13824, heads=40, kv_heads=40)


def decoder_problem(c: Config, cluster: Cluster, order: tuple[int, ...], shape: dict | None = None) -> PartitionProblem:
    """The 70B-shaped decoder (or `shape`) as a PartitionProblem on `order` (formula costs, see module doc)."""
    if shape:
        from dataclasses import replace

        c = replace(c, **shape)
    s, h, f, b = c.seq * c.microbatch, c.hidden, c.ffn, 2  # tokens per microbatch, bf16
    h_kv = h * c.kv_heads // c.heads
    layer_flops = 2 * s * (2 * h * h + 2 * h * h_kv) + 4 * s * s * h + 6 * s * h * f
    layer_params = 2 * h * h + 2 * h * h_kv + 3 * h * f + 2 * h
    names = ["embed"] + [f"layers.{i}" for i in range(c.layers)] + ["norm+lm_head"]
    flops = [0.0] + [float(layer_flops)] * c.layers + [2.0 * s * h * c.vocab]
    mem_traffic = [s * h * b * 2.0] + [layer_params * b + 12.0 * s * h * b] * c.layers + [(c.vocab * h + s * c.vocab) * b]
    params = [c.vocab * h] + [layer_params] * c.layers + [c.vocab * h + h]
    act = [s * h * b] + [34.0 * s * h] * c.layers + [s * c.vocab * b * 2.0]
    n = len(names)
    devs = [cluster.devices[d] for d in order]
    p = len(devs)
    unit_time = tuple(tuple(3.0 * max(fl / d.peak_flops, by / d.mem_bandwidth) for d in devs)
                      for fl, by in zip(flops, mem_traffic))
    boundary = float(s * h * b)
    links = [cluster.link(order[j], order[j + 1]) for j in range(p - 1)]
    btime = tuple(tuple(2.0 * l.transfer_time(boundary) for l in links) for _ in range(n - 1))
    inflight = tuple(min(p - j, c.microbatches) for j in range(p))
    return PartitionProblem(
        unit_names=tuple(names), unit_time=unit_time, boundary_time=btime,
        unit_static_bytes=tuple(16.0 * x for x in params), unit_activation_bytes=tuple(act),
        boundary_bytes=(boundary,) * (n - 1), inflight=inflight, device_memory=tuple(d.memory for d in devs),
        device_names=tuple(d.name for d in devs))


def _eight_different() -> Cluster:
    """8 devices that differ pairwise (kind or memory), one per node: 40,320 distinct orders,
    the exhaustive search's worst case (a branch and bound, see place_stages)."""
    cl = Cluster.preset("h100", 1, memory=40 * GiB)
    for kind, mem in (("a100", 80), ("l4", 24), ("h200", 141), ("h100", 80), ("a100", 40), ("l4", 20), ("h200", 100)):
        cl = Cluster.concat(cl, Cluster.preset(kind, 1, memory=mem * GiB))
    return cl


def bench_speed(c: Config) -> list[dict]:
    out = []
    clusters = {
        f"70B: h100 x{c.gpus} ({c.per_node}/node)": (Cluster.preset("h100", c.gpus, per_node=c.per_node), None),
        f"70B: h100 x{c.gpus // 2} + a100 x{c.gpus // 2} ({c.per_node}/node)": (
            Cluster.concat(Cluster.preset("h100", c.gpus // 2, per_node=c.per_node),
                           Cluster.preset("a100", c.gpus // 2, per_node=c.per_node)), None),
        "13B-shaped: h100 x8, 1 node": (Cluster.preset("h100", 8), LLAMA_13B),
        "13B-shaped: h100 x4 + a100 x4, 2 nodes": (Cluster.concat(Cluster.preset("h100", 4), Cluster.preset("a100", 4)),
                                                   LLAMA_13B),
        "13B-shaped: h100 x2 + a100 x2 + l4 x4, 3 nodes": (
            Cluster.concat(Cluster.concat(Cluster.preset("h100", 2), Cluster.preset("a100", 2)),
                           Cluster.preset("l4", 4)), LLAMA_13B),
        "13B-shaped: 8 all-different devices, 8 nodes": (_eight_different(), LLAMA_13B),
    }
    for name, (cl, shape) in clusters.items():
        times = []
        for _ in range(c.repeats):
            t0 = time.perf_counter()
            pl = place_stages(lambda order: decoder_problem(c, cl, order, shape), cl)
            times.append(time.perf_counter() - t0)
        stages = [b - a for a, b in pl.partition.bounds]
        out.append({
            "cluster": name, "devices": len(cl), "units": pl.problem.n, "method": pl.method,
            "candidates": pl.candidates, "seconds_min": min(times), "seconds_median": sorted(times)[len(times) // 2],
            "bottleneck_ms": pl.partition.bottleneck * 1e3,
            "lower_bound_ms": None if pl.lower_bound is None else pl.lower_bound * 1e3,
            "max_stage_memory_gib": max(pl.partition.stage_memory) / GiB,
            "units_per_stage": f"{min(stages)}..{max(stages)}",
        })
        print(f"(a) {name}: {min(times):.3f}s, {pl.method}, {pl.candidates} candidates, bottleneck "
              f"{pl.partition.bottleneck * 1e3:.2f} ms", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------ (a2)


def _plan_timed(model: torch.nn.Module, x: torch.Tensor, c: Config, method: str) -> tuple[fxpipe.Plan, dict]:
    import os

    cl = Cluster.preset("h100", c.gpus, per_node=c.per_node)
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    plan = fxpipe.plan(model, cl, (x,), microbatches=c.microbatches, capture_method=method)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return plan, {"capture_method": method, "capture_path": plan.capture_path, "wall_s": wall, "cpu_s": cpu,
                  "load_1min": load, "phases_s": dict(plan.timings), "units": len(plan.costs.unit_names),
                  "stages": plan.num_stages, "step_ms": plan.predicted["step_ms"],
                  "fingerprint": plan.fingerprint[:16]}


def bench_end_to_end(c: Config) -> list[dict]:
    """fxpipe.plan of 80-layer 70B-shaped models built on meta onto 64 H100s (see module doc)."""
    import transformers as tf

    from fxpipe.models import TinyGPT

    cfg = tf.LlamaConfig(hidden_size=c.hidden, intermediate_size=c.ffn, num_hidden_layers=c.layers,
                         num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, vocab_size=c.vocab,
                         max_position_embeddings=4096)
    with torch.device("meta"):
        llama = tf.LlamaForCausalLM(cfg)
        tiny = TinyGPT(vocab_size=c.vocab, n_positions=c.e2e_seq, n_embd=c.hidden, n_head=c.heads, n_layer=c.layers)
    x = torch.randint(0, c.vocab, (c.e2e_batch, c.e2e_seq), device="meta")
    cases = [("transformers LlamaForCausalLM (70B config)", llama, "auto")] * c.repeats
    cases += [("fxpipe.models.TinyGPT (hand-written, fx)", tiny, "auto")]
    if c.e2e_full_capture:
        cases += [("transformers LlamaForCausalLM (70B config), every layer captured", llama, "export")]
    rows = []
    for name, model, method in cases:
        plan, row = _plan_timed(model, x, c, method)
        row["model"] = name
        rows.append(row)
        ph = row["phases_s"]
        print(f"(a2) {name} [{method}]: {row['wall_s']:.2f}s wall ({row['cpu_s']:.2f}s cpu, load "
              f"{row['load_1min']:.1f}): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()), file=sys.stderr)
    return rows


def bench_auto(c: Config) -> list[dict]:
    """Auto mode on 64 H100s with and without skipping candidates by their lower bound."""
    import os

    import transformers as tf

    import fxpipe.compiler.auto_plan as auto_plan

    cfg = tf.LlamaConfig(hidden_size=c.auto_hidden, intermediate_size=c.auto_ffn, num_hidden_layers=c.auto_layers,
                         num_attention_heads=c.auto_heads, num_key_value_heads=c.auto_heads, vocab_size=c.vocab)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    x = torch.zeros(c.auto_batch, c.auto_seq, dtype=torch.long, device="meta")
    cl = Cluster.preset("h100", c.gpus, per_node=c.per_node)
    rows = []
    for prune in (False, True):
        auto_plan.AUTO_PRUNE = prune
        try:
            load = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            plan = fxpipe.plan(model, cl, (x,), schedule="auto", microbatches="auto")
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            auto_plan.AUTO_PRUNE = True
        cands = plan.predicted["auto"]
        rows.append({"prune": prune, "wall_s": wall, "cpu_s": cpu, "load_1min": load,
                     "candidates": len(cands), "planned": sum(1 for r in cands if not r.get("skipped")),
                     "skipped": sum(1 for r in cands if r.get("skipped")),
                     "fitting": sum(1 for r in cands if r["fits"]), "schedule": plan.schedule.kind,
                     "microbatches": plan.microbatches, "step_ms": plan.predicted["step_ms"],
                     "phases_s": dict(plan.timings)})
        print(f"(a3) prune={prune}: {wall:.1f}s wall, {rows[-1]['planned']} of {len(cands)} planned, chose "
              f"{plan.schedule.kind} m={plan.microbatches} ({plan.predicted['step_ms']:.1f} ms)", file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------ (b)


def random_instance(rng: random.Random):
    p = rng.randint(2, 4)
    n = rng.randint(p, 12)
    devs = tuple(Device(f"d{i}", "cuda", rng.choice([1.0, 2.0, 3.0, 5.0]), 1e12, rng.choice([6.0, 10.0, 40.0, 1e9]),
                        0.0, 1, node=rng.randint(0, 1)) for i in range(p))
    cl = Cluster(devs, (), (NodeLink(0, 0, rng.choice([4.0, 8.0]), 0.01), NodeLink(1, 1, 2.0, 0.01),
                            NodeLink(-1, -1, rng.choice([0.5, 1.0]), 0.05)))
    work = [rng.choice([1.0, 2.0, 3.0, 4.0, 7.0]) for _ in range(n)]
    act = [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]
    static = [rng.choice([0.0, 1.0, 2.0]) for _ in range(n)]
    bb = [rng.choice([0.0, 1.0, 4.0, 8.0]) for _ in range(n - 1)]

    def make(order):
        sub = cl.subset(order)
        return PartitionProblem(
            tuple(f"u{i}" for i in range(n)), tuple(tuple(w / d.peak_flops for d in sub.devices) for w in work),
            tuple(tuple(2 * sub.link(j, j + 1).transfer_time(bb[k]) for j in range(p - 1)) for k in range(n - 1)),
            tuple(static), tuple(act), tuple(bb), tuple(p - j for j in range(p)),
            tuple(d.memory for d in sub.devices), tuple(d.name for d in sub.devices))

    return cl, make, p, n


def bench_exactness(c: Config) -> dict:
    rng = random.Random(c.seed)
    equal = infeasible = 0
    orders_brute = orders_placed = 0
    for _ in range(c.instances):
        cl, make, p, n = random_instance(rng)
        best = math.inf
        for order in itertools.permutations(range(p)):
            orders_brute += 1
            prob = make(order)
            for part in all_partitions(prob):
                if part.fits:
                    best = min(best, part.bottleneck)
        if not math.isfinite(best):
            infeasible += 1
            try:
                place_stages(make, cl)
            except fxpipe.PlanError:
                equal += 1
            continue
        pl = place_stages(make, cl)
        orders_placed += pl.candidates
        equal += pl.partition.bottleneck == best
    return {"instances": c.instances, "equal": equal, "infeasible_both": infeasible,
            "orders_brute_force": orders_brute, "orders_evaluated_by_place_stages": orders_placed}


# ------------------------------------------------------------------------------------ (c), (d)


def small_model(name: str, c: Config):
    import transformers as tf

    L, H, V, S, B = c.small_layers, c.small_hidden, c.small_vocab, c.small_seq, c.small_batch
    torch.manual_seed(0)
    ids = torch.randint(0, V, (B, S))
    if name == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=L, n_embd=H, n_head=4, vocab_size=V, n_positions=S,
                                             use_cache=False, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
        return m, (ids,)
    if name == "bert":
        m = tf.BertForMaskedLM(tf.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                                             intermediate_size=4 * H, max_position_embeddings=S,
                                             hidden_dropout_prob=0, attention_probs_dropout_prob=0))
        return m, (ids,)
    if name == "vit":
        m = tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=H,
                                                      num_hidden_layers=L, num_attention_heads=4, intermediate_size=4 * H,
                                                      num_labels=1000, hidden_dropout_prob=0,
                                                      attention_probs_dropout_prob=0))
        return m, (torch.randn(B, 3, 32, 32),)
    if name == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=3 * H, num_hidden_layers=L,
                                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=S,
                                               use_cache=False))
        return m, (ids,)
    if name == "resnet":  # ResNet-18-like: 4 stages x 2 basic blocks, widths H/8 .. H
        m = tf.ResNetForImageClassification(tf.ResNetConfig(
            num_channels=3, embedding_size=H // 8, hidden_sizes=[H // 8, H // 4, H // 2, H], depths=[2, 2, 2, 2],
            layer_type="basic", num_labels=1000))
        return m, (torch.randn(B, 3, 32, 32),)
    raise ValueError(name)


def hetero_cluster(c: Config) -> Cluster:
    """Two fast devices in node 0 and two slow ones in node 1, listed interleaved (a poor order)."""
    fast = dict(kind="cpu", peak_flops=4e10 * c.hetero_speedup, mem_bandwidth=2e10 * c.hetero_speedup,
                memory=64 * GiB, launch_overhead=5e-6)
    slow = dict(kind="cpu", peak_flops=4e10, mem_bandwidth=2e10, memory=64 * GiB, launch_overhead=5e-6)
    devs = (Device("fast0", node=0, **fast), Device("slow0", node=1, **slow), Device("fast1", node=0, **fast),
            Device("slow1", node=1, **slow))
    return Cluster(devs, (), (NodeLink(0, 0, 50e9, 5e-6), NodeLink(1, 1, 50e9, 5e-6), NodeLink(-1, -1, 1e9, 2e-5)))


def _baseline_step_ms(plan, name: str) -> float:
    """A baseline split's simulated step (same schedule, devices and costs as the plan)."""
    from fxpipe.passes.explain_plan import baseline_stages

    base = plan.baselines[name]
    stages = baseline_stages(plan, base["bounds"], base.get("recompute"))
    return fxpipe.simulate(plan.with_(stages=stages)).step_time * 1e3


def bench_quality(c: Config) -> tuple[list[dict], list[dict]]:
    rows, hetero = [], []
    for name in c.models:
        model, args = small_model(name, c)
        plan4 = None
        for k in c.device_counts:
            t0 = time.perf_counter()
            plan = fxpipe.plan(model, ["cpu"] * k, args, microbatches=c.small_microbatches)
            wall = time.perf_counter() - t0
            b = plan.predicted["bottleneck_ms"]
            steps = {base: _baseline_step_ms(plan, base) for base in ("uniform", "params")}
            rows.append({"model": name, "devices": k, "units": len(plan.costs.unit_names), "plan_s": round(wall, 2),
                         "fxpipe_step_ms": plan.predicted["step_ms"], "uniform_step_ms": steps["uniform"],
                         "params_step_ms": steps["params"],
                         "fxpipe_ms": b, "uniform_ms": plan.baselines["uniform"]["bottleneck_ms"],
                         "params_ms": plan.baselines["params"]["bottleneck_ms"],
                         "uniform_ratio": plan.baselines["uniform"]["bottleneck_ms"] / b,
                         "params_ratio": plan.baselines["params"]["bottleneck_ms"] / b,
                         "fxpipe_stages": [s.units[1] - s.units[0] for s in plan.stages]})
            print(f"(c) {name} k={k}: {rows[-1]['uniform_ratio']:.2f}x / {rows[-1]['params_ratio']:.2f}x", file=sys.stderr)
            if k == 4:
                plan4 = plan
        if plan4 is not None:
            cl = hetero_cluster(c)
            sched = emit_schedule("1f1b", 4, c.small_microbatches)
            inflight = peak_inflight(sched)

            def make(order, costs=plan4.costs):
                return _problem(costs, cl.subset(order), tuple(range(4)), inflight, True, "adam")

            given = make((0, 1, 2, 3))
            exact_given = partition_stages(given)
            t0 = time.perf_counter()
            pl = place_stages(make, cl)
            t_place = time.perf_counter() - t0
            uni = uniform_partition(given)
            par = params_partition(given, plan4.costs.param_bytes)
            hetero.append({"model": name, "given_order_exact_ms": exact_given.bottleneck * 1e3,
                           "placed_ms": pl.partition.bottleneck * 1e3, "order": [cl.devices[i].name for i in pl.order],
                           "candidates": pl.candidates, "place_s": round(t_place, 3),
                           "uniform_ms": uni.bottleneck * 1e3, "params_ms": par.bottleneck * 1e3,
                           "placement_gain": exact_given.bottleneck / pl.partition.bottleneck,
                           "vs_uniform": uni.bottleneck / pl.partition.bottleneck,
                           "vs_params": par.bottleneck / pl.partition.bottleneck})
    return rows, hetero


def bench_memory(c: Config) -> dict:
    model, args = small_model("gpt2", c)
    k = 4
    sched = emit_schedule("1f1b", k, c.small_microbatches)
    inflight = peak_inflight(sched)
    plan = fxpipe.plan(model, ["cpu"] * k, args, microbatches=c.small_microbatches, recompute=False)
    big = Cluster.from_devices(["cpu"] * k)
    prob = _problem(plan.costs, big, tuple(range(k)), inflight, True, "adam")
    uni = uniform_partition(prob)
    # the smallest per-device memory any partition fits in: binary search on the cap
    lo, hi = 0.0, max(uni.stage_memory)
    for _ in range(50):
        mid = (lo + hi) / 2
        capped = _problem(plan.costs, Cluster.from_devices(["cpu"] * k, memory=mid), tuple(range(k)), inflight, True,
                          "adam")
        try:
            partition_stages(capped)
            hi = mid
        except fxpipe.PlanError:
            lo = mid
    cap = (hi + max(uni.stage_memory)) / 2
    cl = Cluster.from_devices(["cpu"] * k, memory=cap)
    capped_plan = fxpipe.plan(model, cl, args, microbatches=c.small_microbatches, recompute=False)
    recompute = bench_recompute(c, model, args, plan, k, inflight, hi)
    return {"model": "gpt2", "devices": k, "memory_per_device_mib": cap / 2**20, "recompute": recompute,
            "min_feasible_mib": hi / 2**20,
            "uniform_stage_memory_mib": [x / 2**20 for x in uni.stage_memory],
            "uniform_fits": capped_plan.baselines["uniform"]["fits"],
            "params_fits": capped_plan.baselines["params"]["fits"],
            "fxpipe_stage_memory_mib": [s.memory_bytes / 2**20 for s in capped_plan.stages],
            "fxpipe_stages": [s.units[1] - s.units[0] for s in capped_plan.stages],
            "uniform_stages": [b - a for a, b in uni.bounds],
            "fxpipe_bottleneck_ms": capped_plan.predicted["bottleneck_ms"],
            "uniform_bottleneck_ms": capped_plan.baselines["uniform"]["bottleneck_ms"]}


def bench_recompute(c: Config, model: torch.nn.Module, args: tuple, plan: fxpipe.Plan, k: int,
                    inflight: tuple[int, ...], min_plain: float) -> dict:
    """Memory below what any split needs when every stage keeps its activations: the plan
    without recomputation is refused, recompute="auto" fits by recomputing some stages."""
    lo, hi = 0.0, min_plain
    for _ in range(50):  # the smallest per-device memory a partition fits in with recomputation
        mid = (lo + hi) / 2
        try:
            partition_stages(_problem(plan.costs, Cluster.from_devices(["cpu"] * k, memory=mid), tuple(range(k)),
                                      inflight, True, "adam", "auto"))
            hi = mid
        except fxpipe.PlanError:
            lo = mid
    cap = (hi + min_plain) / 2
    cl = Cluster.from_devices(["cpu"] * k, memory=cap)
    try:
        fxpipe.plan(model, cl, args, microbatches=c.small_microbatches, recompute=False)
        refused = ""
    except fxpipe.PlanError as e:
        refused = str(e).splitlines()[0]
    rc = fxpipe.plan(model, cl, args, microbatches=c.small_microbatches, recompute="auto")
    free = fxpipe.plan(model, ["cpu"] * k, args, microbatches=c.small_microbatches, recompute=False)
    uni = uniform_partition(_problem(plan.costs, cl, tuple(range(k)), inflight, True, "adam"))
    return {"memory_per_device_mib": cap / 2**20, "min_plain_mib": min_plain / 2**20, "min_recompute_mib": hi / 2**20,
            "without_recompute": refused,
            "uniform_stage_memory_mib": [x / 2**20 for x in uni.stage_memory], "uniform_fits": uni.fits,
            "unlimited_stage_memory_mib": [s.memory_bytes / 2**20 for s in free.stages],
            "unlimited_bottleneck_ms": free.predicted["bottleneck_ms"], "unlimited_step_ms": free.predicted["step_ms"],
            "stage_memory_mib": [s.memory_bytes / 2**20 for s in rc.stages],
            "stages": [s.units[1] - s.units[0] for s in rc.stages],
            "recompute": [s.recompute for s in rc.stages],
            "bottleneck_ms": rc.predicted["bottleneck_ms"], "step_ms": rc.predicted["step_ms"]}


# ------------------------------------------------------------------------------------ report


def markdown(res: dict) -> str:
    c = res["config"]
    L = ["# Planner benchmark", "",
         f"{res['meta']['platform']}, torch {res['meta']['torch']}, transformers {res['meta']['transformers']}, "
         f"{res['meta']['cores']} cores. `python3 benchmarks/planner.py`.", "",
         f"## (a) Placement + partition time, {c['layers']}-layer 70B-shaped decoder (hidden {c['hidden']}, FFN "
         f"{c['ffn']}, seq {c['seq']}, microbatch {c['microbatch']}, bf16, {c['microbatches']} microbatches)", "",
         "Problem built from per-layer formula costs (no capture). 8-device rows use a Llama-2-13B shape (40 layers, "
         "hidden 5120, FFN 13824): the 70B model's 1 TiB of weights, gradients and Adam state needs >= 13 H100s.", "",
         "| cluster | devices | units | method | orders evaluated | time (s, min of repeats) | bottleneck ms | "
         "lower bound ms | max stage memory GiB | units/stage |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["speed"]:
        lb = "-" if r["lower_bound_ms"] is None else f"{r['lower_bound_ms']:.2f}"
        L.append(f"| {r['cluster']} | {r['devices']} | {r['units']} | {r['method']} | {r['candidates']} | "
                 f"{r['seconds_min']:.3f} | {r['bottleneck_ms']:.2f} | {lb} | {r['max_stage_memory_gib']:.1f} | "
                 f"{r['units_per_stage']} |")
    if res.get("end_to_end"):
        L += ["", f"## (a2) End to end: `fxpipe.plan` of a {c['layers']}-layer 70B-shaped model built on meta, "
                  f"batch {c['e2e_batch']} x seq {c['e2e_seq']}, onto h100 x{c['gpus']} ({c['per_node']}/node), "
                  f"1F1B, {c['microbatches']} microbatches", "",
              "Wall seconds per phase (`plan.timings`); target: total < 10 s, partition+placement < 1 s. The "
              "machine is shared with other jobs: the load average and the process CPU time are given beside the "
              "wall time. `auto` on a meta model captures by repetition (2 layers traced, 78 copied); `export` "
              "captures every layer. Same fingerprint = the same graph.", "",
              "| model | capture | path | capture | shapes | units+costs | schedule | partition+placement | "
              "simulate | total wall | total cpu | load (1 min) | units | fingerprint |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["end_to_end"]:
            ph = r["phases_s"]
            cols = " | ".join(f"{ph.get(k, 0.0):.2f}" for k in ("capture", "shapes", "costs", "schedule",
                                                                  "partition", "simulate"))
            L.append(f"| {r['model']} | {r['capture_method']} | {r['capture_path']} | {cols} | {r['wall_s']:.2f} | "
                     f"{r['cpu_s']:.2f} | {r['load_1min']:.1f} | {r['units']} | `{r['fingerprint']}` |")
    if res.get("auto"):
        L += ["", f"## (a3) Auto mode: Llama-2-7B config on meta, batch {c['auto_batch']} x seq {c['auto_seq']}, "
                  f"onto h100 x{c['gpus']} ({c['per_node']}/node), schedule=auto, microbatches=auto", "",
              "Every candidate planned against candidates planned in the order of their step's lower bound "
              "(`passes/step_bound.py`), skipping those whose bound loses to a plan found (the default).", "",
              "| candidates | planned | skipped | fitting (of planned) | chosen | predicted step ms | wall s | cpu s | "
              "load (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["auto"]:
            L.append(f"| {r['candidates']} | {r['planned']} | {r['skipped']} | {r['fitting']} | {r['schedule']}, "
                     f"m={r['microbatches']} | {r['step_ms']:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['load_1min']:.1f} |")
    e = res["exactness"]
    L += ["", "## (b) Exactness against brute force (orders x contiguous partitions)", "",
          "| instances | equal to brute force | of which infeasible for both | orders brute force | "
          "orders place_stages evaluated |", "|---|---|---|---|---|",
          f"| {e['instances']} | {e['equal']} | {e['infeasible_both']} | {e['orders_brute_force']} | "
          f"{e['orders_evaluated_by_place_stages']} |"]
    L += ["", "## (c) Quality: predicted bottleneck per microbatch and step, fxpipe vs baselines (identical CPU workers)", "",
          f"Random-init `transformers` models, {c['small_layers']} layers, hidden {c['small_hidden']}, vocab "
          f"{c['small_vocab']}, batch {c['small_batch']} x seq {c['small_seq']}, {c['small_microbatches']} microbatches, "
          "1F1B, Adam. Ratio = baseline / fxpipe (>= 1 means fxpipe is faster). Step = the simulated step "
          "(the schedule played against each split's stage times).", "",
          "| model | devices | units | fxpipe ms | uniform ms | params ms | uniform / fxpipe | params / fxpipe | "
          "step fxpipe ms | step uniform ms | step params ms | fxpipe units per stage |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["quality"]:
        L.append(f"| {r['model']} | {r['devices']} | {r['units']} | {r['fxpipe_ms']:.4f} | {r['uniform_ms']:.4f} | "
                 f"{r['params_ms']:.4f} | {r['uniform_ratio']:.2f}x | {r['params_ratio']:.2f}x | "
                 f"{r['fxpipe_step_ms']:.2f} | {r['uniform_step_ms']:.2f} | {r['params_step_ms']:.2f} | "
                 f"{r['fxpipe_stages']} |")
    L += ["", f"Heterogeneous: 2 fast ({c['hetero_speedup']:g}x) devices in node 0, 2 slow in node 1, listed "
              "fast0, slow0, fast1, slow1; 50 GB/s inside a node, 1 GB/s between nodes. Same cost tables (k = 4).", "",
          "| model | exact partition, given order ms | fxpipe placement + partition ms | order chosen | orders | "
          "placement gain | uniform (given order) ms | params (given order) ms | uniform / fxpipe | params / fxpipe |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["hetero"]:
        L.append(f"| {r['model']} | {r['given_order_exact_ms']:.4f} | {r['placed_ms']:.4f} | {', '.join(r['order'])} | "
                 f"{r['candidates']} | {r['placement_gain']:.2f}x | {r['uniform_ms']:.4f} | {r['params_ms']:.4f} | "
                 f"{r['vs_uniform']:.2f}x | {r['vs_params']:.2f}x |")
    m = res["memory"]
    L += ["", "## (d) Memory: the uniform split does not fit, fxpipe's does", "",
          f"GPT-2 ({c['small_layers']} layers, vocab {c['small_vocab']}) on {m['devices']} workers with "
          f"{m['memory_per_device_mib']:.2f} MiB each (the smallest memory any partition fits in is "
          f"{m['min_feasible_mib']:.2f} MiB), 1F1B, Adam.", "",
          "| split | units per stage | stage memory MiB | fits | bottleneck ms |", "|---|---|---|---|---|",
          f"| uniform | {m['uniform_stages']} | {', '.join(f'{x:.2f}' for x in m['uniform_stage_memory_mib'])} | "
          f"{'yes' if m['uniform_fits'] else 'no'} | {m['uniform_bottleneck_ms']:.4f} |",
          f"| fxpipe | {m['fxpipe_stages']} | {', '.join(f'{x:.2f}' for x in m['fxpipe_stage_memory_mib'])} | yes | "
          f"{m['fxpipe_bottleneck_ms']:.4f} |",
          f"| params | - | - | {'yes' if m['params_fits'] else 'no'} | - |"]
    r = m.get("recompute")
    if r:
        L += ["", "## (d2) Memory: no split fits without recomputation; fxpipe recomputes where needed", "",
              f"Same GPT-2 with {r['memory_per_device_mib']:.2f} MiB per worker: below the {r['min_plain_mib']:.2f} MiB "
              f"any split needs when every stage keeps its activations, above the {r['min_recompute_mib']:.2f} MiB "
              f"needed with recomputation. recompute=False is refused: \"{r['without_recompute'][:120]}\"", "",
              "| plan | units per stage | stage memory MiB | recompute | fits | bottleneck ms | step ms |",
              "|---|---|---|---|---|---|---|",
              f"| uniform, no recompute | - | {', '.join(f'{x:.2f}' for x in r['uniform_stage_memory_mib'])} | none | "
              f"{'yes' if r['uniform_fits'] else 'no'} | - | - |",
              f"| fxpipe, unlimited memory | - | {', '.join(f'{x:.2f}' for x in r['unlimited_stage_memory_mib'])} | none | "
              f"no | {r['unlimited_bottleneck_ms']:.4f} | {r['unlimited_step_ms']:.3f} |",
              f"| fxpipe, recompute=auto | {r['stages']} | {', '.join(f'{x:.2f}' for x in r['stage_memory_mib'])} | "
              f"{', '.join('yes' if x else 'no' for x in r['recompute'])} | yes | {r['bottleneck_ms']:.4f} | "
              f"{r['step_ms']:.3f} |"]
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="a,a2,a3,b,c,d",
                    help="comma list of sections to run; the others are kept from the last results file")
    a = ap.parse_args()
    want = set(a.sections.split(","))
    c = Config()
    if a.quick:
        c = Config(instances=30, models=("gpt2",), device_counts=(2, 4), repeats=1, e2e_full_capture=False)
    import transformers

    torch.set_num_threads(1)
    out = ROOT / c.out
    res = {}
    every = {"a", "a2", "a3", "b", "c", "d"}
    if want - every:
        ap.error(f"--sections: unknown {sorted(want - every)}; use a comma list of {', '.join(sorted(every))}")
    if want != every:
        if out.with_suffix(".json").exists():
            res = json.loads(out.with_suffix(".json").read_text())
        else:
            print(f"no {out.with_suffix('.json')} to keep the other sections from: running all", file=sys.stderr)
            want = every
    res.update({"config": asdict(c),
                "meta": {"platform": platform.platform(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "cores": __import__("os").cpu_count()}})
    if "a" in want:
        res["speed"] = bench_speed(c)
    if "a2" in want:
        res["end_to_end"] = bench_end_to_end(c)
    if "a3" in want:
        res["auto"] = bench_auto(c)
    if "b" in want:
        res["exactness"] = bench_exactness(c)
        print(f"(b) {res['exactness']}", file=sys.stderr)
    if "c" in want:
        res["quality"], res["hetero"] = bench_quality(c)
    if "d" in want:
        res["memory"] = bench_memory(c)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    bad = [r for r in res["quality"] if r["uniform_ratio"] < 1 - 1e-9 or r["params_ratio"] < 1 - 1e-9]
    bad += [r for r in res["hetero"] if r["vs_uniform"] < 1 - 1e-9 or r["vs_params"] < 1 - 1e-9 or r["placement_gain"] < 1 - 1e-9]
    ok = res["exactness"]["equal"] == res["exactness"]["instances"] and not bad
    # the meta-device plans must be of the graph a full capture gives
    ok = ok and len({r["fingerprint"] for r in res["end_to_end"] if "Llama" in r["model"]}) == 1
    # skipping candidates by their lower bound must not change auto mode's choice
    ok = ok and len({(r["schedule"], r["microbatches"], r["step_ms"]) for r in res.get("auto", [])}) <= 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
