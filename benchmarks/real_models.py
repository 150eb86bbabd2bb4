"""Real `transformers` families through fxpipe: capture, plan and equivalence on 2 and 4 CPU workers.

Each family is the tiny random-init config of tests/test_real_models.py (no downloads, all
dropouts 0). Per (family, device count) the model is compiled with 1F1B and checked against a
deep copy taken before compiling: inference outputs, the training loss and every parameter's
gradient (fp32, rtol 1e-4, atol 1e-6 for gradients, as in tests/test_equivalence.py).

    python3 benchmarks/real_models.py                 # writes benchmarks/results/real_models.{json,md}
    python3 benchmarks/real_models.py --only llama,t5 --devices 2

`max grad rel diff` is max over parameters of max|g - g_eager| / max|g_eager|, the denominator
floored at 1e-3 x the model's largest eager gradient (gradients that are zero up to round-off,
such as attention key biases, would otherwise divide round-off by round-off).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the model zoo and the equivalence contract live with the tests

from test_real_models import FAMILIES, run_case  # noqa: E402


def one(name: str, p: int, schedule: str, device: str = "cpu") -> dict:
    t0 = time.perf_counter()
    try:
        rec = run_case(name, p, schedule, device=device)
    except Exception as e:  # a mismatch or a failure is a result to report, not a crash
        rec = {"model": name, "devices": p, "schedule": schedule, "infer_equal": False, "train_equal": False,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
               "traceback": traceback.format_exc(limit=-3)}
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    rec["note"] = FAMILIES[name].note
    return rec


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        "# Real models: capture, planning and equivalence",
        "",
        f"`python3 benchmarks/real_models.py` on {meta['machine']} ({meta['cores']} cores), torch {meta['torch']}, "
        f"transformers {meta['transformers']}. Tiny random-init configs (tests/test_real_models.py), all dropouts 0, "
        f"1F1B, workers on `{meta['device']}`. *Equal* means: inference outputs (rtol 1e-4), training loss and every parameter's "
        "`.grad` by name (rtol 1e-4, atol 1e-6) equal eager on a deep copy taken before compiling. "
        "ResNet runs in eval() (BatchNorm on running stats); train-mode BatchNorm with one microbatch is "
        "checked by `test_resnet_train_mode_batchnorm_one_microbatch`.",
        "",
        "| model | capture path | nodes | units | devices | planning time (s) | infer equal | train equal (max grad rel diff) |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | - | - | - | {r['devices']} | - | no | no ({r['error'][:80]}) |")
            continue
        lines.append(
            f"| {r['model']} | {r['capture_path']} | {r['nodes']} | {r['units']} | {r['devices']} | "
            f"{r['planning_s']:.2f} | {'yes' if r['infer_equal'] else 'no'} | "
            f"{'yes' if r['train_equal'] else 'no'} ({r['max_grad_rel_diff']:.1e}) |")
    lines += ["", "Models:", ""]
    for name in dict.fromkeys(r["model"] for r in records):
        note = FAMILIES[name].note
        lines.append(f"- **{name}**" + (f": {note}" if note else ""))
    total = sum(r["wall_s"] for r in records)
    lines += ["", f"Total wall time {total:.1f} s (compile + inference + one training step + eager reference, per case).", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated family names (default: all)")
    ap.add_argument("--devices", default="2,4", help="comma-separated CPU worker counts")
    ap.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    ap.add_argument("--device", default="cpu", help="every worker on this device, e.g. cuda:0 (results go to "
                    "real_models_<device>.{json,md} unless it is cpu)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    records = []
    for name in names:
        for p in (int(x) for x in args.devices.split(",")):
            rec = one(name, p, args.schedule, args.device)
            records.append(rec)
            status = "ok" if rec.get("train_equal") and rec.get("infer_equal") else f"FAILED {rec.get('error', '')}"
            print(f"{name:10s} p={p} {rec.get('capture_path', '-'):6s} nodes={rec.get('nodes', '-')!s:>4} "
                  f"units={rec.get('units', '-')!s:>3} plan={rec.get('planning_s', float('nan')):.2f}s "
                  f"wall={rec['wall_s']:.1f}s {status}", flush=True)
    import transformers

    meta = {"machine": platform.machine() + " " + platform.system(), "cores": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        meta["machine"] += " + " + torch.cuda.get_device_name(torch.device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "real_models" if args.device == "cpu" else f"real_models_{args.device.replace(':', '')}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": records}, indent=1))
    (out / f"{stem}.md").write_text(markdown(records, meta))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0 if all(r.get("train_equal") and r.get("infer_equal") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
