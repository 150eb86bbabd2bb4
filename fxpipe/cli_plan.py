"""`fxpipe plan` and `fxpipe profile`: build the user's model, plan it, save and print the plan.

One handler for both (`profile` sets a.profile: units timed on this machine's devices).
Devices, options and the output path are checked before the factory runs: building a large
model can take minutes, and a typo should not cost them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fxpipe.cli_inputs import CliError, _same_file, load_factory, parse_devices
from fxpipe.cli_report import _fill_hint, _profile_table, _timings_table

__all__: list[str] = []


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
