"""Leftovers of the new-model and new-user exploration, each pinned by a test that fails
without its fix.

* the distributed runtime made every received floating value a leaf that requires grad: a
  detached statistic crossing a stage boundary into an in-place buffer update pulled the
  buffer into autograd's graph (now: per boundary value, the graph says whether it requires
  grad, `requires_grad_flow`, again when parameters are frozen or unfrozen between steps; the
  sender checks its real values against it);
* `step` on a model with nothing to train blamed loss_fn ("it was detached");
* a plan whose stage cuts were edited by hand showed the old per-stage numbers;
* `fxpipe inspect -o` into a missing folder failed for one format and not the others;
* `microbatches="auto"` skipped the sample-independence check;
* the batch x batch output check needed an example batch of at least 3.

The distributed case spawns this file as a worker, once per rank (`python
tests/test_leftovers.py CONFIG.json RANK`), over gloo on 127.0.0.1.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


class StatNet(nn.Module):
    """A statistic taken without grad at the input, used only by the last op (an in-place
    buffer update per microbatch): every cut of a 2-stage pipeline carries it across."""

    def __init__(self):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.register_buffer("ema", torch.ones(8))

    def forward(self, x):
        stat = x.detach().mean(0) * 0.1
        for lin in self.ls:
            x = torch.tanh(lin(x))
        if self.training:
            self.ema.mul_(0.9).add_(stat)
        return x - self.ema


class NoParams(nn.Module):
    def forward(self, x):
        for _ in range(8):
            x = torch.tanh(x) * 2
        return x


def _stat_data():
    torch.manual_seed(0)
    model = StatNet().train()
    x, t = torch.randn(6, 8), torch.randn(6, 8)
    return model, x, t


def _freeze_all_but_last(model: StatNet, frozen: bool) -> None:
    for lin in model.ls[:-1]:
        lin.requires_grad_(not frozen)


def _eager_steps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, between=None) -> list[torch.Tensor]:
    """Two eager steps over the same 2 microbatches in order (the buffer is updated once per
    microbatch), `between(model)` called after the first."""
    losses = []
    for i in range(2):
        if i == 1 and between is not None:
            between(model)
        loss = sum(F.mse_loss(model(xm), tm) * (len(xm) / len(x))
                   for xm, tm in zip(torch.tensor_split(x, 2), torch.tensor_split(t, 2)))
        loss.backward()
        losses.append(loss.detach())
    return losses


# ---- worker (one process per rank) -------------------------------------------------------------


def _worker(cfg_path: str, rank: int) -> None:
    import fxpipe

    cfg = json.loads(Path(cfg_path).read_text())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    out = Path(cfg["out"])
    res: dict = {}
    try:
        model, x, t = _stat_data()
        cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=2, schedule="1f1b", timeout=60,
                            backend="distributed")
        res["losses"] = [cm.step(x, target=t, loss_fn=F.mse_loss).detach().clone() for _ in range(2)]
        res["ema"] = model.ema.clone()
        res["ema_grad_fn"] = model.ema.grad_fn is not None or model.ema.requires_grad
        res["grads"] = {k: q.grad.clone() for k, q in cm.named_parameters() if q.grad is not None}
        # frozen for the first step (nothing before the last layer requires grad), unfrozen for the second
        model, x, t = _stat_data()
        _freeze_all_but_last(model, True)
        cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=2, schedule="1f1b", timeout=60,
                            backend="distributed")
        res["thaw_losses"] = [cm.step(x, target=t, loss_fn=F.mse_loss).detach().clone()]
        _freeze_all_but_last(model, False)
        res["thaw_losses"].append(cm.step(x, target=t, loss_fn=F.mse_loss).detach().clone())
        res["thaw_grads"] = {k: q.grad.clone() for k, q in cm.named_parameters() if q.grad is not None}
        noparam = fxpipe.compile(NoParams(), ["cpu"] * 2, (x,), microbatches=2, timeout=60, backend="distributed")
        try:
            noparam.step(x, target=t, loss_fn=F.mse_loss)
            res["noparams"] = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads the message
            res["noparams"] = f"{type(e).__name__}: {e}"
    except BaseException as e:  # noqa: BLE001
        import traceback

        res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    torch.save(res, out / f"rank{rank}.pt")
    os._exit(0)  # no destroy_process_group: a failed peer must not make exit hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_value_sent_without_grad_arrives_without_grad(tmp_path):
    from fxpipe.compiler.cluster import cpu_calibration
    from test_equivalence import GRAD_TOL, LOSS_TOL

    cpu_calibration()  # cached on disk before the ranks plan: both ranks then plan alike
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"port": _free_port(), "out": str(tmp_path)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(cfg), str(r)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(2)]
    try:
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r, p in enumerate(procs):
        f = tmp_path / f"rank{r}.pt"
        assert f.exists(), f"rank {r} wrote nothing: {p.stderr.read().decode()[-3000:]}"
        results.append(torch.load(f, weights_only=False))
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res['error']}"

    ref, x, t = _stat_data()
    ref_losses = _eager_steps(ref, x, t)
    params = dict(ref.named_parameters())
    thaw, _, _ = _stat_data()
    _freeze_all_but_last(thaw, True)
    thaw_losses = _eager_steps(thaw, x, t, between=lambda mdl: _freeze_all_but_last(mdl, False))
    thaw_params = dict(thaw.named_parameters())
    thaw_covered = set()
    covered = set()
    for r, res in enumerate(results):
        for got, want in zip(res["losses"], ref_losses):
            torch.testing.assert_close(got, want, **LOSS_TOL)
        assert not res["ema_grad_fn"], f"rank {r}: the buffer joined autograd's graph"
        for k, g in res["grads"].items():
            torch.testing.assert_close(g, params[k].grad, **GRAD_TOL)
            covered.add(k)
        # the boundary flags follow a model unfrozen between steps
        for got, want in zip(res["thaw_losses"], thaw_losses):
            torch.testing.assert_close(got, want, **LOSS_TOL)
        for k, g in res["thaw_grads"].items():
            torch.testing.assert_close(g, thaw_params[k].grad, **GRAD_TOL)
            thaw_covered.add(k)
        # item 2, distributed: the real cause, on every rank
        assert "has no parameters" in res["noparams"] and "nothing to train" in res["noparams"], res["noparams"]
        assert "detached" not in res["noparams"]
    assert covered == set(params) and thaw_covered == set(thaw_params)
    # the rank that updates the buffer (the last stage's) matches eager's buffer
    torch.testing.assert_close(results[1]["ema"], ref.ema)


def test_requires_grad_flow_follows_detach_buffers_and_inputs():
    import fxpipe
    from fxpipe.passes.propagate_shapes import VAL
    from fxpipe.runtime.distributed import requires_grad_flow

    model, x, _ = _stat_data()
    for method in ("fx", "export"):
        cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=2, capture_method=method)
        assert cm.plan.capture_path == method
        gm = cm._cap.gm
        flags = requires_grad_flow(gm, model, (False,), VAL)
        by_op = {n.name: n for n in gm.graph.nodes}
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"][0]
        assert flags[ph.name] is False
        # the detached statistic and everything computed from it alone does not require grad
        mean = [n for n in by_op.values() if "mean" in n.name][0]
        assert flags[mean.name] is False
        assert flags[[n for n in by_op.values() if n.op == "output"][0].name] is True
        # an input that requires grad makes x's chain require grad but not the detached branch
        flags_in = requires_grad_flow(gm, model, (True,), VAL)
        assert flags_in[ph.name] is True and flags_in[mean.name] is False
        # frozen parameters and an input without grad: nothing before the buffer update requires grad
        frozen = copy.deepcopy(model).requires_grad_(False)
        flags_fz = requires_grad_flow(gm, frozen, (False,), VAL)
        assert not any(flags_fz[n.name] for n in gm.graph.nodes if n.op != "output")


def test_step_on_a_model_without_trainable_parameters_names_the_cause():
    import pytest

    import fxpipe
    from fxpipe.errors import RuntimeMismatchError

    x = torch.randn(6, 8)
    cm = fxpipe.compile(NoParams(), ["cpu"] * 2, (x,), microbatches=2)
    with pytest.raises(RuntimeMismatchError, match="has no parameters.*nothing to train") as e:
        cm.step(x, target=x, loss_fn=F.mse_loss)
    assert "detached" not in str(e.value)
    frozen = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]).requires_grad_(False)
    cm = fxpipe.compile(frozen, ["cpu"] * 2, (x,), microbatches=2)
    with pytest.raises(RuntimeMismatchError, match="8 parameters and none of them requires grad"):
        cm.step(x, target=x, loss_fn=F.mse_loss)
    assert all(q.grad is None for q in frozen.parameters())
    # the output cut from every parameter (not loss_fn's doing) is named as such
    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            for lin in self.ls:
                x = torch.tanh(lin(x))
            return x.detach() * 2

    cm = fxpipe.compile(Cut(), ["cpu"] * 2, (x,), microbatches=2)
    with pytest.raises(RuntimeMismatchError, match="the model's output does not require grad"):
        cm.step(x, target=x, loss_fn=F.mse_loss)


# ---- a plan whose stage cuts were edited by hand --------------------------------------------


def _mlp(blocks: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(blocks)])


def test_hand_edited_stage_cuts_get_their_own_numbers(tmp_path, capsys):
    import fxpipe
    from fxpipe.cli import main
    from fxpipe.compiler.pipeline import simulate_plan
    from fxpipe.compiler.plan import Plan

    model, x = _mlp(), torch.randn(8, 16)
    plan = fxpipe.plan(model, ["cpu"] * 2, (x,), microbatches=2)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan  # an untouched plan loads as it was written
    assert "restaged" not in Plan.load(path).predicted
    d = json.loads(path.read_text())
    cut = plan.stages[0].units[1]
    new_cut = cut - 3 if cut > 3 else cut + 3  # moves a whole block: both stages' parameters change
    d["stages"][0]["units"][1] = new_cut
    d["stages"][1]["units"][0] = new_cut
    path.write_text(json.dumps(d))
    edited = Plan.load(path)
    costs = edited.costs
    for st in edited.stages:
        a, b = st.units
        assert st.param_bytes == sum(costs.param_bytes[a:b])
        assert st.send_bytes == (costs.boundary_bytes[b - 1] if st.index == 0 else 0.0)
    assert edited.stages[0].param_bytes != plan.stages[0].param_bytes
    assert edited.predicted["restaged"] == [0, 1]
    tl = simulate_plan(edited)
    assert abs(edited.predicted["step_ms"] - tl.step_time * 1e3) < 1e-9
    assert edited.predicted["step_ms"] != plan.predicted["step_ms"]
    # recomputed like the planner computes them: re-cutting back gives the original plan's numbers
    d["stages"][0]["units"][1] = d["stages"][1]["units"][0] = cut
    back = Plan.from_dict(d)
    assert back.stages == plan.stages and back.predicted["step_ms"] == plan.predicted["step_ms"]
    # inspect shows the edited cut's numbers and says they were recomputed
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recomputed from the plan's cost table" in out
    assert f"predicted step {edited.predicted['step_ms']:.2f} ms" in out
    # and the compiled model follows the edited cut, equal to eager
    cm = fxpipe.compile(model, plan=str(path), example_inputs=(x,))
    assert [st.units for st in cm.plan.stages] == [(0, new_cut), (new_cut, len(costs.unit_names))]
    torch.testing.assert_close(cm(x), model(x))


def test_cost_table_that_overflows_the_recomputed_numbers_is_a_damaged_plan(tmp_path):
    """Found by test_fuzz in CI: activation bytes of 1e308 pass the field check, but the
    recomputed stage memory is inf, so the loaded plan could not be saved and loaded again."""
    import fxpipe
    from fxpipe.compiler.plan import Plan
    from fxpipe.errors import PlanError

    plan = fxpipe.plan(_mlp(2), ["cpu"] * 2, (torch.randn(6, 16),), microbatches=3)
    d = plan.to_dict()
    d["costs"]["activation_bytes"][0] = 1e308
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=r"damaged: its cost table gives a non-finite stages\[0\]\.memory_bytes"):
        Plan.load(path)


def test_plan_from_before_a_cost_field_round_trips():
    """A plan written before `transient_bytes` existed loads (the field has a default), and must
    then save and load again: to_dict writes the absent field as [], which reads as absent."""
    import fxpipe
    from fxpipe.compiler.plan import Plan

    plan = fxpipe.plan(_mlp(2), ["cpu"] * 2, (torch.randn(6, 16),), microbatches=3)
    d = plan.to_dict()
    del d["costs"]["transient_bytes"]
    old = Plan.from_dict(d)
    assert old.costs.transient_bytes == ()
    assert Plan.from_dict(json.loads(json.dumps(old.to_dict()))) == old


# ---- inspect -o into a missing folder ---------------------------------------------------------


def test_inspect_output_into_a_missing_folder_is_refused_for_every_format(tmp_path, capsys):
    import fxpipe
    from fxpipe.cli import main

    plan = fxpipe.plan(_mlp(), ["cpu"] * 2, (torch.randn(8, 16),), microbatches=2)
    path = tmp_path / "plan.json"
    plan.save(path)
    for fmt in ("text", "trace", "png", "code"):
        out = tmp_path / f"missing_{fmt}" / "out.x"
        assert main(["inspect", str(path), "--format", fmt, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"folder {out.parent} does not exist" in err, (fmt, err)
        assert not out.parent.exists(), fmt
    # as `fxpipe plan -o` into a missing folder
    assert main(["plan", "nowhere.py:make", "--devices", "cpu,cpu", "-o", str(tmp_path / "missing" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- microbatches="auto" and the sample-independence check ------------------------------------


class SeqFirst(nn.Module):
    """nn.LSTM's default layout: input (seq, batch, features), so dim 0 is time."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 8)
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        h, _ = self.rnn(x)
        for lin in self.ls:
            h = torch.tanh(lin(h))
        return h


def test_auto_microbatches_keeps_a_sequence_first_model_unsplit():
    import fxpipe

    torch.manual_seed(0)
    model = SeqFirst()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 4, 8)  # 8 time steps of 4 samples: auto would otherwise try m = 2, 4, 8
    cm = fxpipe.compile(model, ["cpu"] * 2, example_inputs=(x,), microbatches="auto")
    assert cm.plan.microbatches == 1
    dropped = [r for r in cm.plan.predicted["auto"] if r["microbatches"] > 1]
    assert dropped and all(not r["fits"] and "independently" in r["why"] for r in dropped)
    torch.testing.assert_close(cm(x), ref(x))
    # a batch-first model still has its m > 1 candidates planned
    mlp = _mlp()
    cm = fxpipe.compile(mlp, ["cpu"] * 2, example_inputs=(torch.randn(16, 16),), microbatches="auto")
    rows = cm.plan.predicted["auto"]
    assert not any("independently" in r.get("why", "") for r in rows)
    # (planned, or skipped only because their step's lower bound loses to a plan found)
    assert all(r["fits"] or r.get("skipped") for r in rows if r["microbatches"] > 1)
    assert any(r["microbatches"] > 1 for r in rows)


# ---- batch x batch outputs with an example batch of 2 ------------------------------------------


class Similarity(nn.Module):
    """Every sample against every other (as CLIP's logits_per_image): a (batch, batch) output."""

    def __init__(self):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        for lin in self.ls:
            x = torch.tanh(lin(x))
        return x @ x.t()


def test_batch_by_batch_output_is_refused_with_an_example_batch_of_two():
    import pytest

    import fxpipe
    from fxpipe import PlanError
    from fxpipe.compiler.capture import capture

    torch.manual_seed(0)
    x = torch.randn(2, 8)
    for method in ("fx", "export"):
        with pytest.raises(PlanError, match=r"Similarity .*shape \(2, 2\) for samples 0 and 1.*\(1, 1\).*grows with"):
            fxpipe.compile(Similarity(), ["cpu"] * 2, example_inputs=(x,), microbatches=2, capture_method=method)
        # one microbatch concatenates nothing: exact
        model = Similarity()
        cm = fxpipe.compile(model, ["cpu"] * 2, example_inputs=(x,), microbatches=1, capture_method=method)
        with torch.no_grad():
            torch.testing.assert_close(cm(x), model(x))
    # per-sample outputs at batch 2 are not refused
    cap = capture(_mlp(2), (torch.randn(2, 16),))
    assert cap.batch_size == 2


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
