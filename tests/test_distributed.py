"""The distributed runtime on real gloo ranks: spawned processes, one per plan device.

Each run spawns `tests/dist_worker.py` once per rank (MASTER_ADDR=127.0.0.1, a free port);
one run executes several cases in the same process group, so the process start-up (import
torch, transformers) is paid once per world size. The test process builds every model from
the same seed and checks, against the untouched model:

* the loss returned on EVERY rank equals eager's;
* every parameter's gradient equals eager's, each taken from a rank whose stages use it —
  GPT-2's tied embedding included (its gradient summed across the ranks of its two stages,
  so both ranks hold the whole gradient);
* every rank's `parameters()` together cover the model; inference outputs equal eager's on
  every rank; rank 0's `state_dict()` equals the model's.

Faults (the last case of the 4-rank run): rank 0 hangs before its first send; rank 1 fails
after the timeout naming itself, the instruction and rank 0, and exits; ranks 2 and 3 then
fail naming their own instruction and peer. Every spawned process is killed when the tests
end, whatever happened. The byte packing of a boundary is checked bitwise in-process.
`examples/train_distributed.py` runs unchanged under `torch.distributed.run`. (A rank
killed mid-step, checkpoints and meta-device models: tests/test_checkpoint.py.)
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fxpipe
from fxpipe.errors import FxpipeError, PlanError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker  # noqa: E402

from test_equivalence import GRAD_TOL, LOSS_TOL, OUT_TOL  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """`world` ranks of the worker, started now; `finish()` waits (all but a faulty rank) and
    kills whatever is left, so no rank outlives the test."""

    def __init__(self, world: int, cases: dict, tmp_path: Path, fault: dict | None = None, limit: float = 60.0,
                 preinit: bool = False):
        from fxpipe.compiler.cluster import cpu_calibration

        cpu_calibration()  # cached on disk before the ranks plan: every rank then plans alike
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.world, self.tmp, self.fault, self.limit = world, tmp_path, fault, limit
        cfg = {"world": world, "port": _free_port(), "result_dir": str(tmp_path), "cases": cases, "fault": fault,
               "preinit": preinit}
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(cfg))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.t0 = time.monotonic()
        self.procs = [subprocess.Popen([sys.executable, str(WORKER), str(path), str(r)], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in range(world)]
        self._done = None

    def finish(self):
        """(per-rank results or None, per-rank error text or None, seconds)."""
        if self._done is not None:
            return self._done
        try:
            for r, p in enumerate(self.procs):
                if self.fault is None or self.fault["rank"] != r:
                    p.wait(timeout=max(1.0, self.limit - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
        took = time.monotonic() - self.t0
        results, errors = [], []
        for r in range(self.world):
            res, err = self.tmp / f"rank{r}.pt", self.tmp / f"rank{r}.err"
            results.append(torch.load(res, weights_only=False) if res.exists() else None)
            errors.append(err.read_text() if err.exists() else None)
        self._done = (results, errors, took)
        return self._done

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def reference(case: dict):
    model, args, kwargs, target, loss_fn = dist_worker.MODELS[case["model"]](case["batch"])
    out = model(*args, **kwargs)
    loss = loss_fn(out, target)
    loss.backward()
    with torch.no_grad():
        out = model(*args, **kwargs)
    return model, loss.detach(), (out.logits if hasattr(out, "logits") else out)


def check(name: str, case: dict, results: list):
    model, loss, out = reference(case)
    world = len(results)
    params = dict(model.named_parameters())
    covered: dict[str, int] = {}
    for r, res in enumerate(results):
        got = res[name]
        torch.testing.assert_close(got["loss"], loss, **LOSS_TOL, msg=lambda m: f"{name} rank {r} loss: {m}")
        torch.testing.assert_close(got["output"], out, **OUT_TOL, msg=lambda m: f"{name} rank {r} output: {m}")
        for k in got["params"]:
            covered[k] = covered.get(k, 0) + 1
            want = params[k].grad
            g = got["grads"].get(k)
            assert (g is None) == (want is None), f"{name} rank {r}: {k} grad presence differs from eager"
            if want is not None:
                torch.testing.assert_close(g, want, **GRAD_TOL, msg=lambda m: f"{name} rank {r} grad {k}: {m}")
    assert set(covered) == set(params), f"{name}: parameters no rank holds: {set(params) - set(covered)}"
    sd = results[0][name]["state_dict"]
    ref_sd = model.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in ref_sd:
        assert torch.equal(sd[k], ref_sd[k]), f"{name}: state_dict[{k!r}] differs"
    for r in range(1, world):
        assert results[r][name]["state_dict"] == {}
    return covered


CASES_2 = {
    "mlp_gpipe_uneven": {"model": "mlp", "batch": 10, "microbatches": 4, "schedule": "gpipe"},
    "mlp_1f1b": {"model": "mlp", "batch": 8, "microbatches": 4, "schedule": "1f1b", "via_compile": True},
    "mlp_zb": {"model": "mlp", "batch": 8, "microbatches": 4, "schedule": "zb-h1"},
    "mlp_interleaved": {"model": "mlp", "batch": 8, "microbatches": 4, "schedule": "interleaved"},
    "gpt2_1f1b": {"model": "gpt2", "batch": 4, "microbatches": 2, "schedule": "1f1b"},
    # every stage streams its weights (runtime/offload.py); the tied embedding's host
    # gradients are summed across the two ranks
    "gpt2_offload": {"model": "gpt2", "batch": 4, "microbatches": 2, "schedule": "1f1b", "offload": "on"},
}
CASES_4 = {
    "mlp_1f1b_uneven": {"model": "mlp", "batch": 9, "microbatches": 4, "schedule": "1f1b"},
    "gpt2_gpipe": {"model": "gpt2", "batch": 4, "microbatches": 4, "schedule": "gpipe"},
}
FAULT_TIMEOUT = 4
# Last in the 4-rank run: rank 0 (stage 0, the first to send) hangs before its first send.
# Rank 1 times out waiting for it and exits; rank 2, waiting on rank 1, then sees its peer
# gone and exits; so does rank 3, waiting on rank 2. The test kills rank 0.
FAULT = {"rank": 0, "kind": "hang", "seconds": 300, "case": "fault"}
FAULT_CASE = {"model": "mlp", "batch": 8, "microbatches": 4, "schedule": "1f1b", "timeout": FAULT_TIMEOUT}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both spawns start together (they wait on each other's planning and on peers a lot, so
    sharing the 2 cores makes the whole file faster than running them one after the other)."""
    pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("dist")
    started = {}
    try:
        # limits only guard against a hang: about 40 s on an idle 2-core machine
        started[2] = Run(2, CASES_2, base / "w2", limit=150)  # the ranks initialize the group themselves
        started[4] = Run(4, {**CASES_4, "fault": FAULT_CASE}, base / "w4", fault=FAULT, limit=150, preinit=True)
        yield {k: r.finish() for k, r in started.items()}
    finally:
        for r in started.values():
            r.kill()


@pytest.mark.parametrize("world", [2, 4], ids=["2ranks", "4ranks"])
def test_equal_to_eager(world, runs):
    cases = CASES_2 if world == 2 else CASES_4
    results, errors, _ = runs[world]
    if world == 2:
        assert all(e is None for e in errors), "\n".join(e for e in errors if e)
    assert all(r is not None and set(cases) <= set(r) for r in results), \
        "a rank wrote no results:\n" + "\n".join(e for e in errors if e)
    for name, case in cases.items():
        covered = check(name, case, results)
        if case.get("offload") == "on":  # each rank streamed its own stage's weights, unit by unit
            streamed = [r[name]["streamed"] for r in results]
            assert [sorted(x) for x in streamed] == [r[name]["local_stages"] for r in results]
            assert all(n > 0 for x in streamed for n in x.values())
        if case["model"] == "gpt2":
            # the tied embedding is used by the first and the last stage, on different ranks:
            # both hold it, and both got the summed gradient (checked equal to eager above)
            assert covered["transformer.wte.weight"] == 2


def test_hung_or_dead_rank_fails_the_others_within_timeout(runs):
    results, errors, _ = runs[4]
    assert all("fault" not in r for r in results if r is not None)
    assert errors[0] is None  # hung: killed by the test
    assert all(e is not None for e in errors[1:]), errors
    # rank 1: the hung peer, caught by the timeout, named with the instruction
    assert "PipelineFailure" in errors[1], errors[1]
    assert "rank 1 failed on RECV_ACT(s1,mb0<-d0) (waiting for rank 0)" in errors[1], errors[1]
    assert f"waited {FAULT_TIMEOUT}s" in errors[1], errors[1]
    # ranks 2 and 3: their peer exited (or hung, when the timeout came first): each fails
    # naming its instruction and its peer, well within the timeout of its own wait
    for r in (2, 3):
        assert f"rank {r} failed on RECV_ACT(s{r},mb0<-d{r - 1}) (waiting for rank {r - 1})" in errors[r], errors[r]
    secs = [float(e.splitlines()[0]) for e in errors[1:]]
    assert max(secs) < FAULT_TIMEOUT + 6, secs


def test_boundary_packing_is_bitwise_exact():
    from fxpipe.runtime.distributed import BoundaryLayout, grad_layout

    vals = [torch.randn(3, 5), torch.arange(7), torch.tensor([True, False, True]), torch.randn(2, 2).bfloat16(),
            torch.tensor(2.5, dtype=torch.float64), 11, 0.1, (4, [5, 6]), None, torch.empty(0, 3)]
    lay = BoundaryLayout([v.to("meta") if isinstance(v, torch.Tensor) else v for v in vals], "test")
    buf = lay.pack(vals, torch.device("cpu"))
    assert buf.dtype == torch.uint8 and buf.numel() == lay.nbytes
    got = lay.unpack(buf.clone())
    for a, b in zip(got, vals):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8) if a.numel()
                                                                              else a, b.view(-1).view(torch.uint8) if b.numel() else b)
        else:
            assert a == b and type(a) is type(b)
    one = BoundaryLayout([torch.empty(4, 4, device="meta")], "one")
    t = torch.randn(4, 4)
    assert one.pack([t], torch.device("cpu")).data_ptr() == t.data_ptr()  # a lone tensor is sent from its own memory
    g = grad_layout([torch.empty(2, device="meta"), torch.empty(2, dtype=torch.long, device="meta"), 3], "g")
    assert [r is not None for r in g.refs] == [True, False, False] and len(g.slots) == 1
    with pytest.raises(FxpipeError, match="static shapes"):
        one.pack([torch.randn(5, 4)], torch.device("cpu"))


def test_world_size_mismatch_is_refused(monkeypatch):
    import torch.distributed as dist

    from fxpipe.compiler.pipeline import build_plan
    from fxpipe.runtime.dist_model import DistributedCompiledModel

    model, args, _, _, _ = dist_worker.make_mlp(8)
    comp = build_plan(model, ["cpu", "cpu"], args, microbatches=2)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(PlanError, match=r"the world has 3 ranks but the plan has 2 devices.*--nproc_per_node=2"):
        DistributedCompiledModel(model, comp, timeout=5)
    assert not dist.is_initialized()  # refused before any rendezvous
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(FxpipeError, match="torchrun"):
        DistributedCompiledModel(model, comp, timeout=5)


def test_torchrun_launches_the_example_unchanged(tmp_path):
    """examples/train_distributed.py under `torch.distributed.run --nproc_per_node=2` (gloo,
    CPU): every rank prints every step's loss, equal to an eager run's, and the sharded
    checkpoint it saves holds the eagerly trained weights. About 15 s on an idle 2-core machine."""
    from fxpipe.compiler.cluster import cpu_calibration

    sys.path.insert(0, str(ROOT / "examples"))
    import train_distributed as ex

    cpu_calibration()  # cached on disk: both ranks then plan alike
    steps, ckpt = 3, tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "examples" / "train_distributed.py"), str(steps), str(ckpt)],
                          env=env, capture_output=True, text=True, timeout=150)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = {(int(r), int(s)): float(v) for r, s, v in re.findall(r"rank (\d) step (\d) loss ([-+]?\d\.\d+e[-+]\d+)", proc.stdout)}
    assert sorted(got) == [(r, s) for r in range(2) for s in range(steps)], proc.stdout
    model, x, y = ex.make_model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        for r in range(2):
            assert got[(r, s)] == pytest.approx(loss.item(), rel=1e-5), (r, s, got[(r, s)], loss.item())
    saved = fxpipe.load_checkpoint(ckpt)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(saved[k], v, **GRAD_TOL)
    print(f"torchrun example: {took:.1f}s")
