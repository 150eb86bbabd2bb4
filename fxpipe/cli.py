"""The `fxpipe` command line: plan a model offline, inspect a plan, run a demo.

    fxpipe plan model.py:make --devices 'cpu*2' -o plan.json
    fxpipe inspect plan.json --format text|trace|code
    fxpipe demo

`main(argv)` returns the exit status instead of exiting, so tests call it in-process:
0 = success, 1 = the demo's correctness check failed, 2 = a usage or fxpipe error, reported
as one "fxpipe: error: ..." line on stderr without a traceback.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from fxpipe.compiler.plan import Plan
    from fxpipe.passes.simulate_schedule import Timeline

__all__ = ["main", "build_parser", "parse_devices", "load_factory", "timeline_text", "CliError"]

_MAIN_HELP = """\
fxpipe compiles a PyTorch nn.Module into a pipeline across several devices.

Start with `fxpipe demo` (a small GPT trained across two CPU workers), then plan your own
model: write a file with a function that returns (model, example_args), plan it, and look
at what was decided.
"""

_MAIN_EPILOG = """\
examples:
  fxpipe demo                                        # compile + check + train a small GPT
  fxpipe plan mymodel.py:make --devices 'cpu*2' -o plan.json
  fxpipe inspect plan.json                           # stage table + timeline per device
  fxpipe inspect plan.json --format trace            # Chrome/Perfetto trace
  fxpipe profile mymodel.py:make --devices cuda:0,cuda:1 -o plan.json   # measured costs
  fxpipe <command> --help                            # options of one command
"""

_PLAN_EPILOG = """\
The factory is a function in FILE that returns (model, example_args) or
(model, example_args, example_kwargs); example_args is a tensor, a tuple of arguments or a
dict of keyword arguments, with the batch as dim 0. For example, mymodel.py:

    import torch
    def make():
        layers = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
                  for _ in range(4)]
        return torch.nn.Sequential(*layers, torch.nn.Linear(64, 10)), torch.randn(32, 64)

examples:
  fxpipe plan mymodel.py:make --devices cpu,cpu -o plan.json
  fxpipe plan mymodel.py:make --devices 'cpu*4' --microbatches 8 --schedule gpipe -o plan.json
  fxpipe plan mymodel.py:make --devices cuda:0,cuda:1 --optimizer sgd -o plan.json
  fxpipe plan mymodel.py:make --cluster cluster.json --inference -o plan.json
  fxpipe plan mymodel.py:make --devices 'cpu*4' --baseline params   # compare with equal-parameter stages

A cluster file describes devices that need not exist here (plan for GPUs on a laptop):
  {"devices": [{"name": "gpu0", "kind": "cuda", "peak_flops": 6.7e13,
                "mem_bandwidth": 3.35e12, "memory": 8.5e10}, ...],
   "links": [{"src": 0, "dst": 1, "bandwidth": 4.5e11, "latency": 1e-5}]}
Devices may name their machine ("node": 0) and then be linked per node instead of per pair:
  "node_links": [{"src_node": 0, "dst_node": 0, "bandwidth": 4.5e11, "latency": 5e-6},
                 {"src_node": -1, "dst_node": -1, "bandwidth": 2.5e10, "latency": 2e-5}]
(-1, -1 = between any two different nodes). In Python: fxpipe.Cluster.preset("h100", 64, per_node=8).
"""

_PROFILE_EPILOG = """\
Each unit (the partitioner's atoms) runs on each kind of device in the list: a warm-up,
then repeated timed runs (CUDA events on GPUs), the median kept; on CPU as many copies run
at once as there are CPU workers, since they share the cores. The plan records
cost_source "measured" and `fxpipe inspect` shows it like any plan.

examples:
  fxpipe profile mymodel.py:make --devices cuda:0,cuda:1 -o plan.json
  fxpipe profile mymodel.py:make --devices 'cpu*2' --microbatches 8 -o plan.json
"""

_INSPECT_EPILOG = """\
formats:
  text   the stage table and a predicted timeline, one row per device (default)
  trace  a Chrome trace JSON: open it in https://ui.perfetto.dev or chrome://tracing
         (written to PLAN's name with .trace.json unless -o is given)
  code   the generated program each device runs, as Python source
  png    a Gantt chart and activation memory over time per device (needs matplotlib;
         written to PLAN's name with .png unless -o is given)

examples:
  fxpipe inspect plan.json
  fxpipe inspect plan.json --format trace -o step.trace.json
  fxpipe inspect plan.json --format code
  fxpipe inspect plan.json --why                 # time and memory per stage, baselines
"""

_DEMO_EPILOG = """\
Builds a small GPT-2 (transformers, random init, no download) or, without transformers or
with --model builtin, fxpipe's own TinyGPT; compiles it across the devices; checks outputs
and gradients against the untouched model; trains a few AdamW steps; shows the timeline
and device 0's generated program. Exits 1 if the check fails.

examples:
  fxpipe demo
  fxpipe demo --devices 'cpu*3' --microbatches 6 --steps 5
  fxpipe demo --model builtin --schedule gpipe
"""


class CliError(Exception):
    """A usage problem (bad argument, missing file, bad factory); exit status 2."""


# ---- helpers ------------------------------------------------------------------------------
def parse_devices(text: str) -> list[str]:
    """'cpu,cpu' -> ['cpu', 'cpu']; 'cpu*4' -> four 'cpu'; 'cuda:0,cuda:1' as given."""
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise CliError(f"--devices {text!r} has an empty entry; write e.g. 'cpu,cpu' or 'cpu*2'")
        name, star, count = item.partition("*")
        name = name.strip()
        n = 1
        if star:
            try:
                n = int(count)
            except ValueError:
                n = 0
            if not 1 <= n <= 65536:
                raise CliError(f"--devices entry {item!r}: the count after '*' must be a positive integer, e.g. 'cpu*4'")
        if not name:
            raise CliError(f"--devices entry {item!r} has no device name; write e.g. 'cpu*4'")
        out += [name] * n
    return out


def load_factory(spec: str) -> tuple[Any, tuple, dict]:
    """Import FILE from 'FILE:FACTORY', call FACTORY() and check it returns a model and inputs."""
    from torch import Tensor, nn

    path_text, colon, name = spec.rpartition(":")
    if not colon or not path_text or not name:
        raise CliError(f"model {spec!r} is not of the form FILE.py:FACTORY (e.g. mymodel.py:make)")
    path = Path(path_text)
    if not path.is_file():
        if path.is_dir():
            raise CliError(f"model file {path} is a folder; name the Python file in it, e.g. {path / 'mymodel.py'}:{name}")
        hint = f"; did you mean {path}.py:{name}?" if path.suffix != ".py" and path.with_name(path.name + ".py").is_file() else ""
        raise CliError(f"model file {path} does not exist{hint}")
    mod_name = f"_fxpipe_user_{path.stem}"
    mspec = importlib.util.spec_from_file_location(mod_name, path)
    if mspec is None or mspec.loader is None:
        raise CliError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[mod_name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so the file (and its factory) can import its neighbours
    # The file runs as if started without arguments: a top-level argparse `parse_args()` would
    # otherwise read fxpipe's own arguments and exit with "unrecognized arguments: plan ...".
    argv, sys.argv = sys.argv, [str(path)]
    exits = ("exited (SystemExit: {}) while {}: it calls sys.exit or parses the command line; move that under "
             "`if __name__ == '__main__':`")
    try:
        try:
            mspec.loader.exec_module(module)
        except Exception as e:  # the user's code: report it in one line
            sys.modules.pop(mod_name, None)
            raise CliError(f"importing {path} failed: {type(e).__name__}: {e}") from None
        except SystemExit as e:  # not an Exception: would end fxpipe with the user's exit code, unexplained
            sys.modules.pop(mod_name, None)
            raise CliError(f"{path} " + exits.format(e.code, "being imported")) from None
        factory = getattr(module, name, None)
        if factory is None:
            found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == mod_name)
            raise CliError(f"{path} has no function {name!r}" + (f"; it defines {', '.join(found)}" if found else ""))
        if not callable(factory):
            raise CliError(f"{path}:{name} is not a function but a value of type {type(factory).__name__}")
        try:
            result = factory()
        except Exception as e:
            raise CliError(f"{path}:{name}() raised {type(e).__name__}: {e}") from None
        except SystemExit as e:
            raise CliError(f"{path}:{name}() " + exits.format(e.code, "building the model")) from None
    finally:
        sys.argv = argv
        if folder in sys.path:
            sys.path.remove(folder)
    want = "(model, example_args) or (model, example_args, example_kwargs)"
    if isinstance(result, nn.Module):  # `mymodel.py:MyModel` names the class, or the factory forgot the inputs
        raise CliError(f"{path}:{name}() returned only a model ({type(result).__name__}); planning needs an example "
                       f"batch too: name a function that returns {want}, e.g. `return model, torch.randn(32, 64)`")
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise CliError(f"{path}:{name}() returned {type(result).__name__}; it must return {want}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(model, nn.Module):
        raise CliError(f"{path}:{name}() returned a {type(model).__name__} as the model; it must be a torch.nn.Module")
    if isinstance(args, Tensor):
        args = (args,)
    elif isinstance(args, dict) and len(result) == 2:  # keyword arguments, as fxpipe.compile's example_inputs takes
        args, kwargs = (), args
    if not isinstance(args, tuple):
        raise CliError(f"{path}:{name}() returned example_args of type {type(args).__name__}; "
                       "give a tensor, a tuple of arguments or a dict of keyword arguments")
    if not isinstance(kwargs, dict):
        raise CliError(f"{path}:{name}() returned example_kwargs of type {type(kwargs).__name__}; give a dict")
    return model, args, kwargs


def timeline_text(plan: "Plan", width: int = 100) -> str:
    """The plan's schedule simulated with its predicted stage times, as a text Gantt chart."""
    from fxpipe.passes.render_timeline import render_timeline

    tl = _simulate(plan)
    names = [f"d{i} {d.name}" for i, d in enumerate(plan.cluster.devices)]
    kind = "training step" if plan.schedule.train else "inference pass"
    return f"predicted timeline of one {kind} ({plan.schedule.kind}):\n" + render_timeline(tl, width, names)


def _simulate(plan: "Plan") -> "Timeline":
    """The plan's schedule played against its cost model (fxpipe.simulate)."""
    import fxpipe

    return fxpipe.simulate(plan)


def _code_text(plan: "Plan") -> str:
    from fxpipe.runtime.program import device_source

    names = [d.name for d in plan.cluster.devices]
    return "\n".join(device_source(plan.schedule, d, names) for d in range(len(names)))


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths `a` and `b` name one existing file (through links and relative parts)."""
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _int_or_auto(text: str) -> int | str:
    """argparse type of --microbatches: an integer, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _timings_table(timings: dict[str, float]) -> str:
    """`plan`'s per-phase wall times as a table, in the order the phases ran."""
    total = sum(timings.values())
    label = {"costs": "units+costs", "partition": "partition+placement"}
    lines = [f"planning time: {total:.2f}s", f"  {'phase':<20} {'seconds':>8} {'share':>6}"]
    for k, v in timings.items():
        lines.append(f"  {label.get(k, k):<20} {v:>8.2f} {v / total if total > 0 else 0.0:>6.0%}")
    return "\n".join(lines)


def _fill_hint(plan: "Plan", asked: int | str) -> str:
    """A hint when too few microbatches leave the pipeline mostly idle (the default 4 on 16 GPUs:
    79% bubble), which the stage table alone does not tell a new user how to fix."""
    bubble, p, m = plan.predicted.get("bubble", 0.0), len(plan.cluster.devices), plan.microbatches
    if asked == "auto" or bubble < 0.5 or m >= p:
        return ""
    more = (f"--microbatches auto (the fastest that fits, up to the batch of {plan.batch_size}) or a larger batch"
            if plan.batch_size > m else "a larger batch, then more microbatches")
    return (f"hint: the devices are idle {bubble:.0%} of the step: {m} microbatch{'es' if m != 1 else ''} do{'es' if m == 1 else ''} not fill a pipeline of "
            f"{p} devices; try {more}")


def _profile_table(plan: "Plan") -> str:
    """Measured vs. modelled (roofline) forward and backward time per unit, per device kind."""
    from fxpipe.passes.annotate_costs import CostTable, device_key

    roofline = CostTable.from_dict(plan.costs.to_dict())  # the plan's table without measurements
    measured = plan.predicted.get("measured_costs") or {}
    kinds: dict[str, Any] = {}
    for d in plan.cluster.devices:
        kinds.setdefault(device_key(d), d)
    lines = []
    for key, dev in kinds.items():
        fwd, bwd = (measured.get("fwd_s") or {}).get(key), (measured.get("bwd_s") or {}).get(key)
        if fwd is None or bwd is None:
            continue
        lines.append(f"measured on {dev.name} ({key}), ms per microbatch; model = roofline estimate")
        lines.append(f"  {'unit':<36} {'fwd':>8} {'model':>8} {'bwd':>8} {'model':>8}")
        for u, name in enumerate(roofline.unit_names):
            lines.append(f"  {name[:36]:<36} {fwd[u] * 1e3:>8.3f} {roofline.fwd_time(u, dev) * 1e3:>8.3f} "
                         f"{bwd[u] * 1e3:>8.3f} {roofline.bwd_time(u, dev) * 1e3:>8.3f}")
        tf, tb = sum(fwd), sum(bwd)
        mf = sum(roofline.fwd_time(u, dev) for u in range(len(roofline.unit_names)))
        mb = sum(roofline.bwd_time(u, dev) for u in range(len(roofline.unit_names)))
        lines.append(f"  {'total':<36} {tf * 1e3:>8.3f} {mf * 1e3:>8.3f} {tb * 1e3:>8.3f} {mb * 1e3:>8.3f}"
                     f"   (measured / model: fwd {tf / mf if mf else float('nan'):.2f}x, "
                     f"bwd {tb / mb if mb else float('nan'):.2f}x)")
    return "\n".join(lines) if lines else "no measured costs in the plan"


# ---- commands -----------------------------------------------------------------------------
def _cmd_plan(a: argparse.Namespace) -> int:
    import fxpipe

    from fxpipe.compiler.pipeline import check_options, virtual_stage_count

    if a.microbatches != "auto" and a.microbatches < 1:
        raise CliError(f"--microbatches must be >= 1 or 'auto', got {a.microbatches}")
    recompute = {"on": True, "off": False}.get(a.recompute, a.recompute)
    # Devices and option combinations are checked before the model is built: building a large
    # model takes minutes, and a typo in --devices should not cost them.
    devices = fxpipe.Cluster.load(a.cluster) if a.cluster else fxpipe.Cluster.from_devices(parse_devices(a.devices))
    check_options(microbatches=a.microbatches, schedule=a.schedule, optimizer=a.optimizer, train=not a.inference,
                  recompute=recompute, offload=a.offload)
    if a.schedule != "auto":
        virtual_stage_count(a.schedule, a.virtual_stages)
    elif a.virtual_stages is not None:
        raise CliError("--virtual-stages cannot be given with --schedule auto (it tries interleaved with 2); "
                       "give --schedule interleaved to choose the number")
    if a.profile:
        from fxpipe.runtime.compiled_model import _runnable_device

        for i, d in enumerate(devices.devices):
            try:
                _runnable_device(d, i)
            except fxpipe.PlanError:
                raise CliError(f"fxpipe profile times every unit on this machine's devices, and device {i} "
                               f"({d.name!r}, kind {d.kind}) is not one of them; give --devices that exist here "
                               "(e.g. 'cpu,cpu'), or use `fxpipe plan` (roofline costs) for GPU presets, cluster "
                               "files and 'meta'") from None
    out = Path(a.output)
    if not out.parent.is_dir():
        raise CliError(f"cannot write {out}: folder {out.parent} does not exist")
    if out.is_dir():  # checked before planning, which can take minutes
        raise CliError(f"cannot write {out}: it is a folder; give a file name, e.g. -o {out / 'plan.json'}")
    model_file = Path(a.model.rpartition(":")[0])
    if _same_file(out, model_file):  # `-o mymodel.py` would replace the user's source with JSON
        raise CliError(f"-o {out} is the model file itself; write the plan elsewhere, e.g. -o plan.json")
    t0 = time.perf_counter()
    print(f"fxpipe: building the model from {a.model} ...", end="", file=sys.stderr, flush=True)
    model, args, kwargs = load_factory(a.model)
    print(f" {time.perf_counter() - t0:.2f}s ({type(model).__name__})", file=sys.stderr, flush=True)
    plan = fxpipe.plan(model, devices, args, example_kwargs=kwargs or None, microbatches=a.microbatches,
                       schedule=a.schedule, train=not a.inference, optimizer=a.optimizer,
                       virtual_stages=a.virtual_stages, progress=True, profile=a.profile,
                       recompute=recompute, offload=a.offload)
    try:
        plan.save(out)
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror or e}") from None
    if a.profile:
        print(_profile_table(plan))
        print()
    print(plan.summary())
    hint = _fill_hint(plan, a.microbatches)
    if hint:
        print(hint)
    print(_timings_table(plan.timings))
    if a.baseline:
        from fxpipe.passes.explain_plan import compare_baseline

        print()
        print(compare_baseline(plan, a.baseline))
    print(f"wrote {out}; look at it with: fxpipe inspect {out}")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from fxpipe.compiler.plan import Plan

    src = Path(a.plan)
    if a.output and _same_file(Path(a.output), src):  # would replace the plan with its own rendering
        raise CliError(f"-o {a.output} is the plan file being inspected; write to another file, "
                       f"e.g. -o {src.with_name(src.stem + '.txt')}")
    if a.output and not Path(a.output).parent.is_dir():  # as `plan -o`: every format alike, nothing created
        raise CliError(f"cannot write {a.output}: folder {Path(a.output).parent} does not exist; create it first "
                       "or write elsewhere")
    try:
        plan = Plan.load(src)
        if a.why:
            from fxpipe.passes.explain_plan import explain

            if a.format != "text":
                raise CliError("--why prints text; leave out --format (or use --format text)")
            text = explain(plan)
        elif a.format in ("trace", "png"):
            tl = _simulate(plan)
        else:
            text = _code_text(plan) if a.format == "code" else plan.summary() + "\n\n" + timeline_text(plan)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # Plan.load checks the structure but not every field's type; a hand-edited file can
        # still fail later, and that is the file's fault, not a crash to show a traceback for.
        raise CliError(f"plan file {src} is damaged ({type(e).__name__}: {e}); re-create it with `fxpipe plan`") from None
    if a.format == "png":
        from fxpipe.passes.plot_timeline import plot_timeline

        out = Path(a.output) if a.output else src.with_name(src.stem + ".png")
        names = [f"d{i} {d.name}" for i, d in enumerate(plan.cluster.devices)]
        if out.is_dir():
            raise CliError(f"cannot write {out}: it is a folder; give a file name, e.g. -o {out / 'plan.png'}")
        try:
            plot_timeline(tl, out, names, title=f"{plan.model_name}: {plan.schedule.kind}, {plan.microbatches} microbatches")
        except OSError as e:  # unwritable folder, disk full, a file where a folder should be
            raise CliError(f"cannot write {out}: {e.strerror or e}") from None
        print(f"wrote {out} (predicted step {tl.step_time * 1e3:.3f} ms)")
        return 0
    if a.format == "trace":
        out = Path(a.output) if a.output else src.with_name(src.stem + ".trace.json")
        trace = tl.to_chrome_trace()
        names = [f"d{i} {d.name}" for i, d in enumerate(plan.cluster.devices)]
        for e in trace["traceEvents"]:  # Perfetto's rows named as in the text timeline, not "device 3"
            if e["ph"] == "M" and e["name"] == "process_name":
                e["args"]["name"] = names[e["pid"]]
        slices = sum(1 for e in trace["traceEvents"] if e["ph"] == "X")  # instant RECVs are left out
        _write(out, json.dumps(trace))
        print(f"wrote {out} ({slices} slices on {len(names)} devices, predicted step {tl.step_time * 1e3:.3f} ms); "
              "open it in https://ui.perfetto.dev or chrome://tracing")
        return 0
    if a.output:
        _write(Path(a.output), text + "\n")
        print(f"wrote {a.output}")
    else:
        print(text)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    import torch

    import fxpipe
    from fxpipe.models import demo_gpt

    devices = parse_devices(a.devices)
    if a.steps < 0 or a.microbatches < 1:
        raise CliError("--steps must be >= 0 and --microbatches >= 1")
    torch.manual_seed(0)
    try:
        model, what = demo_gpt(a.model)
    except ImportError:
        raise CliError("--model gpt2 needs transformers: pip install 'fxpipe[hf]'") from None
    model.train()
    ref = copy.deepcopy(model)  # untouched eager copy to check against
    batch = max(8, a.microbatches)
    x = torch.randint(0, 512, (batch, 32))
    target = torch.roll(x, -1, dims=1)  # next-token targets

    def logits(out: Any) -> torch.Tensor:
        return out.logits if hasattr(out, "logits") else out

    def loss_fn(out: Any, t: torch.Tensor) -> torch.Tensor:
        lg = logits(out)
        return torch.nn.functional.cross_entropy(lg.flatten(0, 1).float(), t.to(lg.device).flatten())

    print(f"fxpipe demo: {what} on {len(devices)} devices ({', '.join(devices)}), batch {tuple(x.shape)}, "
          f"{a.microbatches} microbatches, schedule {a.schedule}")
    cm = fxpipe.compile(model, devices, (x,), microbatches=a.microbatches, schedule=a.schedule,
                        optimizer="adam", progress=True)
    print(cm.plan.summary())

    print("\ncheck against the untouched model:")
    with torch.no_grad():
        fwd = (logits(cm(x)).float().cpu() - logits(ref(x)).float()).abs().max().item()
    loss = cm.step(x, target=target, loss_fn=loss_fn).float().cpu()
    ref_loss = loss_fn(ref(x), target)
    ref_loss.backward()
    grads = dict(ref.named_parameters())
    gdiff, worst, ok = 0.0, "-", True
    for name, p in model.named_parameters():
        r = grads[name].grad
        if (p.grad is None) != (r is None):
            ok, worst = False, f"{name} (gradient missing on one side)"
            continue
        if r is None:
            continue
        g = p.grad.float().cpu()
        d = (g - r).abs().max().item()
        if d > gdiff:
            gdiff, worst = d, name
        ok &= torch.allclose(g, r, rtol=1e-4, atol=1e-5)
    ldiff = abs(loss.item() - ref_loss.item())
    ok &= fwd <= 1e-4 and ldiff <= 1e-4
    print(f"  forward  max |cm(x) - model(x)|     = {fwd:.3g}")
    print(f"  loss     |step loss - eager loss|   = {ldiff:.3g} ({loss.item():.5f} vs {ref_loss.item():.5f})")
    print(f"  grads    max |grad - eager grad|    = {gdiff:.3g} over {len(grads)} parameters (worst: {worst})")
    print(f"  {'PASS' if ok else 'FAIL'}")

    if a.steps:
        print(f"\ntraining {a.steps} AdamW steps on this batch:")
        opt = torch.optim.AdamW(cm.parameters(), lr=3e-3)
        for i in range(a.steps):
            cm.zero_grad()
            t0 = time.perf_counter()
            step_loss = cm.step(x, target=target, loss_fn=loss_fn)
            opt.step()
            print(f"  step {i + 1}: loss {step_loss.item():.4f} ({(time.perf_counter() - t0) * 1e3:.0f} ms)")

    print("\n" + timeline_text(cm.plan))
    code = cm.code(0).rstrip("\n").splitlines()
    keep = 20
    print("\ngenerated program of device 0:")
    print("\n".join(code[:keep]))
    if len(code) > keep:
        print(f"    # ... {len(code) - keep} more lines; see all: cm.code(0), or fxpipe inspect PLAN --format code")
    return 0 if ok else 1


# ---- parser and entry point ---------------------------------------------------------------
def _plan_arguments(pl: argparse.ArgumentParser) -> None:
    """The options `plan` and `profile` share (what to plan and how)."""
    pl.add_argument("model", metavar="FILE.py:FACTORY", help="file and function that return (model, example_args[, example_kwargs])")
    where = pl.add_mutually_exclusive_group(required=True)
    where.add_argument("--devices", metavar="LIST", help="comma list of devices: 'cpu,cpu', 'cuda:0,cuda:1', 'cpu*4', or GPU presets "
                       "for offline planning: 'h100*16', 'h100*8,a100*8' (8 per node)")
    where.add_argument("--cluster", metavar="FILE.json", help="a JSON cluster file instead of --devices")
    pl.add_argument("--microbatches", "-m", type=_int_or_auto, default=4,
                    help="microbatches per batch, or 'auto' (the fastest predicted that fits; default 4)")
    pl.add_argument("--schedule", type=str.lower, choices=("1f1b", "gpipe", "interleaved", "zb-h1", "auto"), default="1f1b",
                    help="pipeline schedule, or 'auto' (the fastest predicted that fits; default 1f1b)")
    pl.add_argument("--recompute", type=str.lower, choices=("auto", "on", "off"), default="auto",
                    help="activation recomputation per stage: 'auto' (only stages that would not fit otherwise; "
                         "default), 'on' (every stage) or 'off'")
    pl.add_argument("--offload", type=str.lower, choices=("auto", "on", "off"), default="auto",
                    help="weight streaming per stage: 'auto' (a stage keeps params, grads and optimizer state in host "
                         "memory and streams each unit's weights in only where it would not fit otherwise; default), "
                         "'on' (every stage) or 'off'")
    pl.add_argument("--virtual-stages", type=int, default=None, metavar="V",
                    help="stages per device for --schedule interleaved (default 2)")
    pl.add_argument("--optimizer", type=str.lower, choices=("adam", "sgd", "sgd-momentum"), default="adam",
                    help="optimizer whose state the memory model counts (default adam)")
    pl.add_argument("--inference", action="store_true", help="plan forward passes only (no gradients or optimizer state)")
    pl.add_argument("--baseline", type=str.lower, choices=("uniform", "params"), default=None,
                    help="also print this baseline's stage table next to fxpipe's: uniform layer counts, or equal "
                         "parameter bytes (DeepSpeed / torch pipelining style), with the same cost model")
    pl.add_argument("-o", "--output", default="plan.json", metavar="PLAN.json", help="where to write the plan (default plan.json)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="fxpipe", description=_MAIN_HELP, epilog=_MAIN_EPILOG, formatter_class=fmt)
    from fxpipe import __version__

    p.add_argument("--version", action="version", version=f"fxpipe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="<command>")

    pl = sub.add_parser("plan", help="plan a model offline and save the plan as JSON",
                        description="Plan a model for a set of devices (runs nothing on them) and save the plan.",
                        epilog=_PLAN_EPILOG, formatter_class=fmt)
    _plan_arguments(pl)
    pl.set_defaults(func=_cmd_plan, profile=False)

    pr = sub.add_parser("profile", help="time every unit on the real devices, then plan with the measured costs",
                        description="Run each unit's forward and backward on the devices given (they must exist "
                                    "here), print measured vs. modelled times per unit, and save a plan priced "
                                    "with the measurements.", epilog=_PROFILE_EPILOG, formatter_class=fmt)
    _plan_arguments(pr)
    pr.set_defaults(func=_cmd_plan, profile=True)

    ins = sub.add_parser("inspect", help="show a saved plan: stage table, timeline, trace, generated code",
                         description="Show what a plan decided.", epilog=_INSPECT_EPILOG, formatter_class=fmt)
    ins.add_argument("plan", metavar="PLAN.json", help="a plan written by `fxpipe plan`")
    ins.add_argument("--format", "-f", type=str.lower, choices=("text", "trace", "code", "png"), default="text",
                     help="what to show (default text)")
    ins.add_argument("--why", action="store_true",
                     help="explain the plan: each stage's time (compute, transfer, bubble) and memory (params, grads, "
                          "optimizer state, activations, buffers), and the baselines' predicted times")
    ins.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout (trace: default PLAN.trace.json)")
    ins.set_defaults(func=_cmd_inspect)

    de = sub.add_parser("demo", help="compile, check and train a small GPT across devices",
                        description="A self-checking tour of fxpipe on a small GPT.", epilog=_DEMO_EPILOG,
                        formatter_class=fmt)
    de.add_argument("--devices", default="cpu,cpu", metavar="LIST", help="comma list of devices (default cpu,cpu)")
    de.add_argument("--microbatches", "-m", type=int, default=4, help="microbatches per batch (default 4)")
    de.add_argument("--steps", type=int, default=3, help="AdamW training steps to run (default 3)")
    de.add_argument("--schedule", type=str.lower, choices=("1f1b", "gpipe", "interleaved", "zb-h1"), default="1f1b",
                    help="pipeline schedule (default 1f1b)")
    de.add_argument("--model", type=str.lower, choices=("auto", "gpt2", "builtin"), default="auto",
                    help="auto: GPT-2 from transformers if installed, else builtin TinyGPT")
    de.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fxpipe command line with `argv` (default sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and argparse's own usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if a.command is None:
        parser.print_help(sys.stderr)
        return 2
    from fxpipe.errors import FxpipeError

    err = _LineTracker(sys.stderr)
    sys.stderr = err
    try:
        return a.func(a)
    except (CliError, FxpipeError) as e:
        if not err.at_line_start:
            print(file=sys.stderr, flush=True)  # end the progress line the error cut short
        print(f"fxpipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not err.at_line_start:
            print(file=sys.stderr, flush=True)  # as above: "fxpipe: capture ..." stays on its own line
        print("fxpipe: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fxpipe inspect plan.json | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    finally:
        sys.stderr = err.stream


class _LineTracker:
    """Wraps stderr to know whether a progress line ("fxpipe: capture ...") is still open."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.at_line_start = True

    def write(self, s: str) -> int:
        if s:
            self.at_line_start = s.endswith("\n")
        return self.stream.write(s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
