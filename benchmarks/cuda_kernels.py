"""Fused CuPy kernels vs eager PyTorch vs torch.compile (Inductor), forward, on one GPU.

Each pattern at ROWS x COLS (default 16384 x 4096), fp32 and bf16. Time: CUDA events around
batches of calls (so the queue stays full and host overhead is hidden where the GPU is the
bottleneck), median of the batches. Bandwidth: the pattern's compulsory bytes (each input read
once, each output written once) over the time, as a fraction of a device-to-device copy of
N elements measured in the same run (copy bandwidth = 2 N bytes-per-element / copy time).

    PYTHONPATH=. python3 benchmarks/cuda_kernels.py [--out DIR] [--rows R] [--cols C] [--repeats K]

--repeats K times the copy, the fused kernel, eager and Inductor in turn K rounds per pattern,
so a borderline ratio comes with its spread across rounds (the medians are judged).

Writes DIR/cuda_kernels.json and DIR/cuda_kernels.md (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fxpipe.cuda import fused_ops, kernels


def _time(fn, batch=20, samples=9, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(samples):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(batch):
            fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / batch)
    return statistics.median(ts)  # ms


def _patterns(R, C, dtype):
    dev = "cuda"
    x = torch.randn(R, C, device=dev, dtype=dtype)
    y = torch.randn(R, C, device=dev, dtype=dtype)
    b = torch.randn(C, device=dev, dtype=dtype)
    w = torch.randn(C, device=dev, dtype=dtype)
    m = torch.randn(R, C, device=dev, dtype=dtype)
    es = x.element_size()
    N = R * C

    def eager_bg(x, b):
        return F.gelu(x + b)

    def eager_ln(a, c, w, b):
        return F.layer_norm(a + c, (C,), w, b, 1e-5)

    def eager_sm(x, m):
        return torch.softmax(x * 0.125 + m, -1)

    def eager_da(x, r):
        return F.dropout(x, 0.1, True) + r

    def eager_new_gelu(x):  # GPT-2's NewGELUActivation, op by op: a general elementwise chain
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))

    def eager_swiglu(g, u):
        return F.silu(g) * u

    new_gelu = ("mul(i0,0.5);pow(i0,3.0);mul(v1,0.044715);add(i0,v2);mul(v3,0.7978845608028654);tanh(v4);"
                "add(v5,1.0);mul(v0,v6)")

    return [
        ("bias_gelu", eager_bg, lambda: fused_ops.bias_gelu(x, b), (x, b), 2 * N * es + C * es),
        ("add_layer_norm", eager_ln, lambda: fused_ops.add_layer_norm(x, y, (C,), w, b, 1e-5)[0], (x, y, w, b),
         3 * N * es + 2 * C * es),
        ("scale_mask_softmax", eager_sm, lambda: fused_ops.scale_mask_softmax(x, 0.125, False, m, "add"), (x, m),
         3 * N * es),
        ("dropout_add", eager_da, lambda: fused_ops.dropout_add(x, y, 0.1, True), (x, y), 3 * N * es),
        ("chain:new_gelu", eager_new_gelu, lambda: fused_ops.elementwise_chain(new_gelu, x), (x,), 2 * N * es),
        ("chain:swiglu", eager_swiglu, lambda: fused_ops.elementwise_chain("silu(i0);mul(v0,i1)", x, y), (x, y),
         3 * N * es),
    ]


ELEMENTWISE_PATTERNS = ("bias_gelu", "dropout_add", "chain:new_gelu", "chain:swiglu")
ROW_PATTERNS = ("add_layer_norm", "scale_mask_softmax")
# (unroll, min_blocks, waves) and (ln_values, softmax_vectors) tried by --sweep
ELEMENTWISE_CONFIGS = [(1, 8, 1), (2, 8, 2), (4, 4, 2), (1, 8, 4), (2, 8, 4), (1, 8, 8), (1, 8, 16), (1, 8, 64)]
ROW_CONFIGS = [(8, 2), (16, 2), (16, 4), (32, 8), (8, 4)]


def _geomean(xs):
    return float(torch.tensor(xs, dtype=torch.float64).log().mean().exp())


def sweep(R: int, C: int, out: str) -> dict:
    """Time every pattern's fused forward under each launch configuration; set the best per
    family (geometric mean of time over its patterns and both dtypes) and return the record."""
    rows = []
    base = dataclasses.asdict(kernels.TUNING)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            pats = {p[0]: p for p in _patterns(R, C, dtype)}
            vec = 16 // torch.empty((), dtype=dtype).element_size()
            for (u, mb, w) in ELEMENTWISE_CONFIGS:
                kernels.set_tuning(unroll=u, min_blocks=mb, waves=w)
                for name in ELEMENTWISE_PATTERNS:
                    ms = _time(pats[name][2])
                    res = {}
                    if not name.startswith("chain:"):
                        fn = kernels._function("elementwise", name + "_fwd", dtype, vec, 32, 1)
                        res = kernels.kernel_resources(fn)
                    rows.append({"family": "elementwise", "config": [u, mb, w], "pattern": name,
                                 "dtype": str(dtype).replace("torch.", ""), "ms": ms, **res})
                    print(json.dumps(rows[-1]), flush=True)
            kernels.set_tuning(**{k: base[k] for k in ("unroll", "min_blocks", "waves")})
            for (lv, sv) in ROW_CONFIGS:
                kernels.set_tuning(ln_values=lv, softmax_vectors=sv)
                for name in ROW_PATTERNS:
                    rows.append({"family": "rows", "config": [lv, sv], "pattern": name,
                                 "dtype": str(dtype).replace("torch.", ""), "ms": _time(pats[name][2])})
                    print(json.dumps(rows[-1]), flush=True)
            kernels.set_tuning(ln_values=base["ln_values"], softmax_vectors=base["softmax_vectors"])

    def best(family, configs, pattern_filter=None):
        score = {}
        for c in configs:
            ts = [r["ms"] for r in rows if r["family"] == family and tuple(r["config"]) == c
                  and (pattern_filter is None or r["pattern"] in pattern_filter)]
            score[c] = _geomean(ts)
        return min(score, key=score.get), score

    ew, ew_score = best("elementwise", ELEMENTWISE_CONFIGS)
    # LayerNorm and softmax have a knob each: choose them separately
    ln = min({c[0] for c in ROW_CONFIGS}, key=lambda v: _geomean(
        [r["ms"] for r in rows if r["pattern"] == "add_layer_norm" and r["config"][0] == v]))
    sm = min({c[1] for c in ROW_CONFIGS}, key=lambda v: _geomean(
        [r["ms"] for r in rows if r["pattern"] == "scale_mask_softmax" and r["config"][1] == v]))
    chosen = {"unroll": ew[0], "min_blocks": ew[1], "waves": ew[2], "ln_values": ln, "softmax_vectors": sm}
    kernels.set_tuning(**chosen)
    record = {"default": base, "chosen": chosen, "rows": rows,
              "elementwise_geomean_ms": {str(list(c)): v for c, v in ew_score.items()}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cuda_kernels_sweep.json"), "w") as f:
        json.dump(record, f, indent=1)
    lines = [f"# Launch-configuration sweep at {R}x{C} (forward, median ms)", "",
             f"Defaults in `fxpipe/cuda/kernels.py` TUNING: {base}. Chosen here: {chosen}.", "",
             "| family | config | pattern | dtype | ms | regs | spill bytes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['config']} | {r['pattern']} | {r['dtype']} | {r['ms']:.4f} | "
                     f"{r.get('regs', '-')} | {r.get('local_bytes', '-')} |")
    lines += ["", "Elementwise configs (unroll, min_blocks, waves), geometric mean ms over patterns and dtypes:", ""]
    lines += [f"- {list(c)}: {v:.4f}" for c, v in sorted(ew_score.items(), key=lambda kv: kv[1])]
    with open(os.path.join(out, "cuda_kernels_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return record


def pack_bench(out: str) -> list[dict]:
    """Packing a boundary's tensors into one buffer: one copy_ per tensor vs the pack kernel
    (`fxpipe/cuda/pack.py`). Host time per call (what a pipeline worker spends issuing it) and
    GPU time (CUDA events around batches)."""
    from fxpipe.cuda.pack import pack_into

    cases = {
        "1 big + 7 small": [torch.randn(8, 512, 768, device="cuda")] + [torch.randint(0, 9, (8, 512), device="cuda")
                                                                       for _ in range(7)],
        "8 small": [torch.randn(8, 64, device="cuda") for _ in range(8)],
    }
    rows = []
    for name, ts in cases.items():
        parts, off = [], 0
        for t in ts:
            parts.append((t, off))
            off += -(-t.numel() * t.element_size() // 256) * 256
        buf = torch.empty(off, dtype=torch.uint8, device="cuda")

        def loop():
            for t, o in parts:
                nb = t.numel() * t.element_size()
                buf[o:o + nb].copy_(t.view(-1).view(torch.uint8))

        def kern():
            pack_into(buf, parts)

        row = {"case": name, "bytes": off}
        for label, fn in (("copy_loop", loop), ("kernel", kern)):
            row[f"{label}_gpu_ms"] = _time(fn)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            row[f"{label}_host_us"] = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(out, "cuda_pack.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["# Packing a boundary into one buffer: copy_ per tensor vs the pack kernel", "",
             "| case | bytes | copy_ loop GPU ms | kernel GPU ms | copy_ loop host us/call | kernel host us/call |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['bytes']} | {r['copy_loop_gpu_ms']:.4f} | {r['kernel_gpu_ms']:.4f} | "
              f"{r['copy_loop_host_us']:.1f} | {r['kernel_host_us']:.1f} |" for r in rows]
    with open(os.path.join(out, "cuda_pack.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time copy, fused, eager and Inductor in turn this many rounds; report medians and ranges")
    ap.add_argument("--sweep", action="store_true",
                    help="first time each launch configuration (writes cuda_kernels_sweep.{json,md}) and use the best")
    args = ap.parse_args()
    if not kernels.available():
        sys.exit("needs a CUDA device and CuPy")
    R, C = args.rows, args.cols
    import cupy

    if args.sweep:
        sweep(R, C, args.out)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cupy": cupy.__version__,
           "rows": R, "cols": C, "tuning": dataclasses.asdict(kernels.TUNING)}
    results = []
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            src = torch.randn(R, C, device="cuda", dtype=dtype)
            dst = torch.empty_like(src)
            for name, eager, fused, inputs, nbytes in _patterns(R, C, dtype):
                t0 = time.perf_counter()
                kernels.SHARE = "dlpack"  # the same kernels, tensors wrapped as CuPy arrays per call
                t_d = _time(fused)
                kernels.SHARE = "pointer"
                comp = None
                if not args.no_inductor:
                    comp = torch.compile(eager, dynamic=False)
                    comp(*inputs)
                # the copy, fused, eager and Inductor timed in turn, `repeats` times: the spread of
                # the ratios across rounds is the noise a borderline target must be read against
                rounds = []
                for _ in range(args.repeats):
                    rounds.append({"copy_ms": _time(lambda: dst.copy_(src)), "fused_ms": _time(fused),
                                   "eager_ms": _time(lambda: eager(*inputs)),
                                   "inductor_ms": None if comp is None else _time(lambda: comp(*inputs))})
                row = summarize(name, str(dtype).replace("torch.", ""), nbytes, 2 * src.numel() * src.element_size(),
                                rounds)
                row["fused_dlpack_ms"] = t_d
                results.append(row)
                print(json.dumps(row), f"({time.perf_counter() - t0:.1f}s)", flush=True)
                _write(args.out, env, results)
    _write(args.out, env, results)
    pack_bench(args.out)


def summarize(pattern: str, dtype: str, nbytes: int, copy_bytes: int, rounds: list[dict]) -> dict:
    """One table row from `rounds` of interleaved timings ({"copy_ms", "fused_ms", "eager_ms",
    "inductor_ms"}, ms): per round the bandwidth fraction (compulsory bytes / fused time over the
    copy's bandwidth that round), the speedup over eager and the time against Inductor; the row
    holds their medians and, over the rounds, their [min, max].

    Example:
        >>> r = summarize("p", "float32", 300, 200, [{"copy_ms": 1.0, "fused_ms": 1.5, "eager_ms": 3.0,
        ...                                          "inductor_ms": 1.5}])
        >>> r["fused_bw_frac"], r["speedup_vs_eager"], r["time_vs_inductor"]
        (1.0, 2.0, 1.0)
    """
    def med(key):
        vals = [r[key] for r in rounds if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def spread(vals):
        vals = [v for v in vals if v is not None]
        return [min(vals), max(vals)] if vals else None

    bw = [nbytes / r["fused_ms"] / (copy_bytes / r["copy_ms"]) for r in rounds]
    speed = [r["eager_ms"] / r["fused_ms"] for r in rounds]
    vs_ind = [None if r.get("inductor_ms") is None else r["fused_ms"] / r["inductor_ms"] for r in rounds]
    copy_ms = med("copy_ms")
    copy_bw = copy_bytes / (copy_ms * 1e-3)
    t_f, t_e, t_i = med("fused_ms"), med("eager_ms"), med("inductor_ms")
    return {
        "pattern": pattern, "dtype": dtype, "copy_ms": copy_ms, "fused_ms": t_f, "eager_ms": t_e, "inductor_ms": t_i,
        "fused_bw_frac": statistics.median(bw),
        "eager_bw_frac": nbytes / (t_e * 1e-3) / copy_bw,
        "inductor_bw_frac": None if t_i is None else nbytes / (t_i * 1e-3) / copy_bw,
        "speedup_vs_eager": statistics.median(speed),
        "time_vs_inductor": None if t_i is None else statistics.median([v for v in vs_ind if v is not None]),
        "bytes": nbytes, "copy_GBps": copy_bw / 1e9, "rounds": len(rounds),
        "fused_bw_frac_range": spread(bw), "speedup_vs_eager_range": spread(speed),
        "time_vs_inductor_range": spread(vs_ind),
    }


def _write(out, env, results):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cuda_kernels.json"), "w") as f:
        json.dump({"env": env, "results": results}, f, indent=1)
    f2 = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    lines = [f"# Fused CuPy kernels at {env['rows']}x{env['cols']} ({env['device']}, torch {env['torch']}, "
             f"CuPy {env['cupy']})", "", f"Launch configuration: {env.get('tuning')}.", "",
             "Forward, median ms (CUDA events); bw = compulsory bytes / time as a fraction of a device-to-device copy "
             "of the same N elements in the same run. With several rounds (--repeats) the ratios are medians over "
             "the rounds, with their range in brackets; the targets are judged on the medians.", "",
             "| pattern | dtype | copy ms | fused ms | fused (DLPack args) ms | eager ms | inductor ms | fused bw | eager bw | inductor bw "
             "| speedup vs eager | fused / inductor time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def rng(r, key, fmt):  # " (lo-hi)" over the rounds, when there were several
        v = r.get(key + "_range")
        return "" if r.get("rounds", 1) < 2 or v is None else f" ({format(v[0], fmt)}-{format(v[1], fmt)})"

    for r in results:
        lines.append(
            f"| {r['pattern']} | {r['dtype']} | {r['copy_ms']:.3f} | {r['fused_ms']:.3f} | {f2(r.get('fused_dlpack_ms'), '.3f')} | {r['eager_ms']:.3f} | "
            f"{f2(r['inductor_ms'], '.3f')} | {r['fused_bw_frac']:.0%}{rng(r, 'fused_bw_frac', '.0%')} | {r['eager_bw_frac']:.0%} | "
            f"{f2(r['inductor_bw_frac'], '.0%')} | {r['speedup_vs_eager']:.2f}x{rng(r, 'speedup_vs_eager', '.2f')} | "
            f"{f2(r['time_vs_inductor'], '.2f')}x{rng(r, 'time_vs_inductor', '.2f')} |")
    misses = []
    for r in results:
        why = [w for w, bad in (("bw < 90% of copy", r["fused_bw_frac"] < 0.9),
                                ("> 1.1x Inductor", (r["time_vs_inductor"] or 0) > 1.1),
                                ("< 1.8x over eager", r["speedup_vs_eager"] < 1.8)) if bad]
        if why:
            misses.append(f"- {r['pattern']} {r['dtype']}: " + ", ".join(why))
    lines += ["", "Targets (issue 6): >= 90% of copy bandwidth, <= 1.1x Inductor's time, >= 1.8x over eager.",
              "Missed:" if misses else "All met.", *misses, "",
              "Command: `PYTHONPATH=. python3 benchmarks/cuda_kernels.py --out $OUT` (device tool, H100)."]
    with open(os.path.join(out, "cuda_kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
