"""`fxpipe inspect`: show a saved plan as text, a Chrome trace, generated code or a PNG.

Also `--why` (passes/explain_plan). A damaged plan file is reported as one CliError line,
and -o is refused where it would overwrite the plan being read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fxpipe.cli_inputs import CliError, _same_file
from fxpipe.cli_report import _code_text, _simulate, _write, timeline_text

__all__: list[str] = []


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
