"""The distributed runtime used the way users get it wrong, on real gloo ranks.

This file is both the test and the worker: the test spawns it once per rank
(`python tests/test_dist_user.py CFG RANK`, torchrun's environment variables set by hand);
each rank appends what happened in each phase to `rank{r}.json` as it goes, so a rank that
is killed still leaves its record. Every spawned process is killed when its test ends.

Run A (2 ranks, one process group, phases in order):
* example inputs of different batch sizes per rank -> PlanError naming the example inputs;
* a different model on one rank -> PlanError naming the model, not the plan;
* planning that came out otherwise on rank 1 (as when each rank measures its own CPU: on a
  machine without fxpipe's calibration cache the README's command failed now and then) ->
  rank 1 runs rank 0's plan; different plan files given by the user -> PlanError;
* models built from different seeds -> compile works, `step` refuses (PlanError) until
  `load_state_dict` of one state dict on every rank; then AdamW steps (30 samples in 4
  microbatches) equal eager's losses and gradients, and inference equals eager's;
* `step` with a different batch on one rank -> RuntimeMismatchError on both ranks at once
  (before this, gloo aborted the process on the size mismatch);
* the loss function raises on the last rank -> the same RuntimeMismatchError on both ranks
  at once, naming loss_fn, the user's error and rank 1, and a retry works (before: the other
  rank failed with PipelineFailure after waiting for gradients and the retry was refused).
Run B (3 ranks): rank 2 never calls `step` -> ranks 0 and 1 fail within the timeout saying
every rank must call it together.
In-process: a plan for a described GPU cluster on this CPU machine, and a script run without
torchrun, are refused naming the fix (the latter before any planning).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_launch import free_port, launch, rank_setup  # noqa: E402

LIMIT = 75.0  # seconds a whole run may take before every rank is killed


def _mlp(seed: int = 0, batch: int = 30):
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16),
                          nn.GELU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(123)
    return model, torch.randn(batch, 8, generator=g), torch.randn(batch, 4, generator=g)


# ---- worker ---------------------------------------------------------------------------------
def _worker(cfg_path: str, rank: int) -> None:
    import torch.nn.functional as F

    import fxpipe

    cfg, record, attempt = rank_setup(cfg_path, rank)
    world = cfg["world"]

    compile_ = lambda m, x, t=cfg["timeout"]: fxpipe.compile(m, ["cpu"] * world, (x,), microbatches=4,  # noqa: E731
                                                             backend="distributed", timeout=t)
    if cfg["run"] == "A":
        model, x, y = _mlp(batch=30 + 2 * rank)
        attempt("inputs", lambda: compile_(model, x))
        model, x, y = _mlp()
        if rank == 1:
            model[6] = torch.nn.Linear(16, 4, bias=False)
        attempt("model", lambda: compile_(model, x))

        # planning that came out otherwise on one rank (each rank measures its own CPU, or
        # profiles): rank 1 plans gpipe, and runs rank 0's 1f1b plan instead of refusing
        model, x, y = _mlp()
        if rank == 1:
            real = fxpipe.api.build_plan
            fxpipe.api.build_plan = lambda *a, **k: real(*a, **{**k, "schedule": "gpipe"})
        cm = compile_(model, x)
        if rank == 1:
            fxpipe.api.build_plan = real
        loss = cm.step(x, target=y, loss_fn=F.mse_loss).item()
        record("adopt", kind=cm.plan.schedule.kind, loss=loss, want=F.mse_loss(_mlp()[0](x), y).item())
        # plan files that differ are the user's choice: refused, not overridden
        plan = fxpipe.plan(model, ["cpu"] * world, example_inputs=(x,), microbatches=4,
                           schedule="gpipe" if rank == 1 else "1f1b")
        attempt("planfiles", lambda: fxpipe.compile(model, plan=plan, example_inputs=(x,), backend="distributed",
                                                    timeout=cfg["timeout"]))

        model, x, y = _mlp(seed=rank)
        ref, _, _ = _mlp(seed=0)
        cm = compile_(model, x)
        attempt("seeds", lambda: cm.step(x, target=y, loss_fn=F.mse_loss))
        cm.load_state_dict(ref.state_dict())
        opt, ropt = torch.optim.AdamW(cm.parameters(), lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2)
        refp = dict(ref.named_parameters())
        losses, grad_err = [], 0.0
        for _ in range(3):
            loss = cm.step(x, target=y, loss_fn=F.mse_loss)
            rl = F.mse_loss(ref(x), y)
            rl.backward()
            grad_err = max([grad_err] + [(q.grad - refp[k].grad).abs().max().item() for k, q in cm.named_parameters()])
            opt.step(), ropt.step(), opt.zero_grad(), ropt.zero_grad()
            losses.append((loss.item(), rl.item()))
        cm.eval(), ref.eval()
        with torch.no_grad():
            out_err = (cm(x) - ref(x)).abs().max().item()
        cm.train()
        record("train", losses=losses, grad_err=grad_err, out_err=out_err,
               mine=sorted(k for k, _ in cm.named_parameters()))
        xb, yb = (x[:20], y[:20]) if rank == 1 else (x, y)
        attempt("batch", lambda: cm.step(xb, target=yb, loss_fn=F.mse_loss))

        def bad_loss(o, t):
            if rank == world - 1:
                raise ValueError("user loss bug")
            return F.mse_loss(o, t)
        attempt("raise", lambda: cm.step(x, target=y, loss_fn=bad_loss))
        attempt("retry", lambda: cm.step(x, target=y, loss_fn=F.mse_loss))
    else:  # "B": the last rank never calls step
        model, x, y = _mlp()
        cm = compile_(model, x)
        if rank < world - 1:
            attempt("absent", lambda: cm.step(x, target=y, loss_fn=F.mse_loss))
        else:
            record("absent", ok=None)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:  # until the others have failed
                done = [Path(cfg["dir"]) / f"rank{r}.json" for r in range(world - 1)]
                if all(p.exists() and "absent" in p.read_text() for p in done):
                    break
                time.sleep(0.2)
    record("end")
    os._exit(0)  # no destroy: the group may be broken on purpose


# ---- harness --------------------------------------------------------------------------------
def _launch(tmp_path: Path, world: int, run: str, timeout: float) -> list[dict]:
    return launch(__file__, tmp_path, world, LIMIT, run=run, timeout=timeout)


def test_user_mistakes_on_two_ranks(tmp_path):
    timeout = 5.0
    logs = _launch(tmp_path, 2, "A", timeout)
    for r, ph in enumerate(logs):
        e = ph["inputs"]
        assert e["type"] == "PlanError" and "different example inputs or devices" in e["msg"] and f"batch {30 + 2 * r}" in e["msg"]
        e = ph["model"]
        assert e["type"] == "PlanError" and "traced different models" in e["msg"] and "same model" in e["msg"]
        a = ph["adopt"]
        assert a["kind"] == "1f1b" and abs(a["loss"] - a["want"]) < 1e-6, a
        e = ph["planfiles"]
        assert e["type"] == "PlanError" and "planned differently" in e["msg"] and "plan file" in e["msg"], e
        e = ph["seeds"]
        assert e["type"] == "PlanError" and "different values" in e["msg"] and "torch.manual_seed" in e["msg"]
        t = ph["train"]
        for got, want in t["losses"]:
            assert abs(got - want) < 1e-5, t["losses"]
        assert t["grad_err"] < 1e-5 and t["out_err"] < 1e-5, t
        e = ph["batch"]
        assert e["type"] == "RuntimeMismatchError" and "made different calls" in e["msg"], e
        assert f"[({20 if r == 1 else 30}, 8)]" in e["msg"]
        e = ph["raise"]
        assert e["type"] == "RuntimeMismatchError" and "loss_fn bad_loss raised ValueError: user loss bug" in e["msg"]
        assert "rank 1" in e["msg"] and e["s"] < timeout, e
        assert e["msg"] == logs[0]["raise"]["msg"], (e, logs[0]["raise"])  # the same error on every rank
        assert ph["retry"]["ok"], ph["retry"]
    assert sorted(logs[0]["train"]["mine"] + logs[1]["train"]["mine"]) == sorted(
        k for k, _ in _mlp()[0].named_parameters())


def test_rank_that_never_calls_step_fails_the_others_within_timeout(tmp_path):
    timeout = 4.0
    logs = _launch(tmp_path, 3, "B", timeout)
    for r in (0, 1):
        e = logs[r]["absent"]
        assert e["type"] == "PipelineFailure" and "every rank must call it together" in e["msg"], e
        assert e["s"] < timeout + 5, e


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_plan_for_a_described_gpu_cluster_is_refused_naming_the_fix(monkeypatch):
    import torch.distributed as dist

    import fxpipe
    from fxpipe.errors import PlanError

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)  # as torchrun would: the plan fits the world, but not this machine
    model, x, _ = _mlp()
    plan = fxpipe.plan(model, fxpipe.Cluster.preset("h100", 2, per_node=2), example_inputs=(x,), microbatches=2)
    with pytest.raises(PlanError, match=r"does not exist on this rank's machine \(0 CUDA devices\).*"
                                        r"plan for this machine's devices"):
        fxpipe.compile(model, plan=plan, example_inputs=(x,), backend="distributed", timeout=5)
    assert not dist.is_initialized()  # refused before any rendezvous


def test_script_run_without_torchrun_is_refused_before_planning(monkeypatch):
    import fxpipe
    from fxpipe.errors import RuntimeMismatchError

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr("fxpipe.api.build_plan", lambda *a, **k: pytest.fail("planned before the launch check"))
    model, x, _ = _mlp()
    with pytest.raises(RuntimeMismatchError, match=r"torchrun --nproc_per_node=3 train.py"):
        fxpipe.compile(model, ["cpu"] * 3, (x,), backend="distributed", timeout=5)


if __name__ == "__main__":
    try:
        _worker(sys.argv[1], int(sys.argv[2]))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
