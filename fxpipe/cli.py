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
import os
import sys
from typing import Any, Sequence

# The commands live one per module (cli_plan, cli_inspect, cli_demo) over what they share
# (cli_inputs, cli_report); the names below stay importable from fxpipe.cli.
from fxpipe.cli_demo import _cmd_demo
from fxpipe.cli_inputs import CliError, load_factory, parse_devices
from fxpipe.cli_inspect import _cmd_inspect
from fxpipe.cli_plan import _cmd_plan
from fxpipe.cli_report import timeline_text

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


# ---- helpers ------------------------------------------------------------------------------
def _int_or_auto(text: str) -> int | str:
    """argparse type of --microbatches: an integer, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


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
