"""The distributed backend follows train/eval and BatchNorm like the local one, on 2 gloo ranks.

This file is both the test and the worker (as tests/test_dist_user.py): the test spawns it
once per rank; each rank appends what happened in each phase to `rank{r}.json`. One process
group runs every phase, in order:

* BatchNorm with m = 4 (with and without recomputation): the buffers after `step`, gathered by
  `state_dict()` and written by `save_checkpoint`, and after a training-mode call, equal eager
  run on the microbatches in order; the MicrobatchStatisticsWarning comes once, on rank 0 (before: once per rank);
* a BatchNorm used by stages on both ranks: a training-mode step or call is refused on both
  ranks naming the module (before: each rank updated its own copy, rank 0's running_mean
  was 0.053 off eager's); in eval mode it runs and equals eager; under torch.export (the
  graph writes the statistics) refused alike (before: num_batches_tracked 2.0 off eager's);
* a forward reading `self.training` (fx), with one module put in eval mode on rank 0 only:
  refused on both ranks (before: rank 0 refused alone and rank 1's call was paired with
  rank 0's next one), and after `train()` on rank 0 both compute eager's output;
* one rank with a module in another mode, a parameter frozen (before: ignored, the owning
  rank trained it anyway), or a target of the wrong batch size: refused on both ranks at once
  (before: not noticed, or the other rank hung until the timeout);
* inputs of another feature shape or dtype than planned, or a call under torch.autocast:
  refused on both ranks, the group stays usable (before: a stage failed midway and every
  later call was refused);
  `buffers()` / `named_buffers()` exist (this rank's), as on the local CompiledModel;
* dropout with m = 2: a seeded distributed step equals the local backend's (same masks);
* a loss_fn failing on the last rank (raises on the second microbatch, returns a non-scalar,
  a float, a detached tensor): the same RuntimeMismatchError on both ranks at once, `.grad`
  as before, and the next step equals eager (before: rank 0 failed with "rank 1 is gone",
  both marked the group broken).
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_launch import launch, rank_setup  # noqa: E402

LIMIT = 150.0  # seconds the whole run may take before every rank is killed
TIMEOUT = 10.0  # fxpipe's per-message timeout in the run


def _bn_model():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, 16), nn.BatchNorm1d(16),
                         nn.GELU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).train()


class _SharedNorm(torch.nn.Module):
    """One BatchNorm used at both ends of the model: its two uses land on two ranks."""

    def __init__(self) -> None:
        from torch import nn

        super().__init__()
        self.a, self.bn, self.c = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)
        self.b = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.bn(self.b(self.bn(self.a(x)))))


class _Doubling(torch.nn.Module):
    """Reads `self.training`: fx keeps only the branch taken at capture."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.lin(x))
        return x * 2 if self.training else x


def _linears() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)], torch.nn.Linear(8, 4))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)


def _eager_in_order(model, x, t, m: int) -> tuple[dict[str, torch.Tensor], float]:
    """The reference: eager on the microbatches one after the other (state dict, batch loss)."""
    import torch.nn.functional as F

    loss = 0.0
    for xc, tc in zip(x.tensor_split(m), t.tensor_split(m)):
        loss += F.mse_loss(model(xc), tc).item() * len(xc) / len(x)
    return model.state_dict(), loss


def _max_err(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---- worker ---------------------------------------------------------------------------------
def _worker(cfg_path: str, rank: int) -> None:
    import torch.nn.functional as F

    import fxpipe
    from fxpipe.errors import MicrobatchStatisticsWarning

    cfg, record, attempt = rank_setup(cfg_path, rank)
    world, folder = cfg["world"], Path(cfg["dir"])
    torch.set_num_threads(1)

    def compile_(model, x, m, capture_method="fx", **kw):
        return fxpipe.compile(model, ["cpu"] * world, (x,), microbatches=m, backend="distributed", timeout=TIMEOUT,
                              capture_method=capture_method, **kw)

    x, t = _data()
    # BatchNorm, m = 4: buffers equal eager on the microbatches in order, recompute or not
    for rec in (False, True):
        model = _bn_model()
        ref = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cm = compile_(model, x, 4, recompute=rec)
        n_warn = sum(issubclass(w.category, MicrobatchStatisticsWarning) for w in caught)
        loss = cm.step(x, target=t, loss_fn=F.mse_loss).item()
        want, want_loss = _eager_in_order(ref, x, t, 4)
        sd = cm.state_dict()
        ck = folder / f"ck{int(rec)}"
        cm.save_checkpoint(ck)
        res = {"warnings": n_warn, "recompute": [s.recompute for s in cm.plan.stages], "loss": loss,
               "want_loss": want_loss}
        if rank == 0:
            res["sd_err"] = _max_err(sd, want)
            res["ck_err"] = _max_err(fxpipe.load_checkpoint(ck), want)
            moved = _bn_model().state_dict()
            res["moved"] = max((want[k].double() - moved[k].double()).abs().max().item() for k in want)
        # inference in training mode updates the statistics per microbatch too, as locally
        with torch.no_grad():
            got = cm(x)
            want_out = torch.cat([ref(xc) for xc in x.tensor_split(4)])
        sd = cm.state_dict()
        res["call_out_err"] = (got - want_out).abs().max().item()
        if rank == 0:
            res["call_sd_err"] = _max_err(sd, ref.state_dict())
        record(f"bn{int(rec)}", **res)

    # a BatchNorm on both ranks: refused in training mode, equal to eager in eval mode
    torch.manual_seed(0)
    model = _SharedNorm().train()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MicrobatchStatisticsWarning)
        cm = compile_(model, x, 2)
    record("shared_stages", local=cm.local_stages, users=len(getattr(cm, "_shared_modules", ())))
    attempt("shared_step", lambda: cm.step(x, target=t, loss_fn=F.mse_loss))
    attempt("shared_call", lambda: cm(x))
    model.bn.eval()
    ref.bn.eval()
    loss = cm.step(x, target=t, loss_fn=F.mse_loss).item()
    want = F.mse_loss(ref(x), t).item()
    sd = cm.state_dict()
    record("shared_eval", loss=loss, want=want,
           sd_err=_max_err(sd, ref.state_dict()) if rank == 0 else None)

    # the same under torch.export: the graph writes the statistics (no module to look at)
    torch.manual_seed(0)
    model = _SharedNorm().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MicrobatchStatisticsWarning)
        cm = compile_(model, x, 2, capture_method="export")
    record("export_stages", local=cm.local_stages, path=cm.plan.capture_path)
    attempt("export_step", lambda: cm.step(x, target=t, loss_fn=F.mse_loss))

    # a mode the fx graph fixed, changed on rank 0 only
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Doubling() for _ in range(4)]).train()
    ref = copy.deepcopy(model)
    cm = compile_(model, x, 2)
    if rank == 0:
        model[0].eval()
    attempt("mode_call", lambda: cm(x))
    attempt("mode_step", lambda: cm.step(x, target=t, loss_fn=F.mse_loss))
    model.train()
    with torch.no_grad():
        got = attempt("mode_fixed", lambda: cm(x))
    record("mode_out", err=(got - ref(x)).abs().max().item() if got is not None else None)

    # dropout, m = 2: the distributed step draws the local backend's masks (same seed, same
    # loss and gradients; before, each rank's own generator: 1.1575 against 1.1530)
    def dropout_net():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Dropout(0.3),
                                                         torch.nn.Linear(16, 8)) for _ in range(4)],
                                   torch.nn.Linear(8, 4)).train()

    runs = []
    for backend in ("local", "distributed"):
        model = dropout_net()
        cm = fxpipe.compile(model, ["cpu"] * world, (x,), microbatches=2, timeout=TIMEOUT, backend=backend)
        torch.manual_seed(5)
        loss = cm.step(x, target=t, loss_fn=F.mse_loss).item()
        runs.append((loss, {k: q.grad.clone() for k, q in cm.named_parameters()}, torch.rand(()).item()))
    (l_loss, l_grads, l_next), (d_loss, d_grads, d_next) = runs
    record("dropout", local=l_loss, dist=d_loss, next=[l_next, d_next], n=len(d_grads),
           grad_err=max((g - l_grads[k]).abs().max().item() for k, g in d_grads.items()))

    # a module in another mode on one rank (a leaf BatchNorm: no check of its own), and a
    # target of the wrong batch size on one rank
    model = _bn_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MicrobatchStatisticsWarning)
        cm = compile_(model, x, 2)
    if rank == 1:
        model[4].eval()
    attempt("submodule_mode", lambda: cm.step(x, target=t, loss_fn=F.mse_loss))
    model.train()
    if rank == 1:  # frozen on one rank only: the ranks would disagree on which gradients cross
        model[0].weight.requires_grad_(False)
    attempt("frozen", lambda: cm.step(x, target=t, loss_fn=F.mse_loss))
    model[0].weight.requires_grad_(True)
    attempt("bad_target", lambda: cm.step(x, target=t[:12] if rank == 1 else t, loss_fn=F.mse_loss))
    attempt("after", lambda: cm.step(x, target=t, loss_fn=F.mse_loss))
    # as the local runtime: inputs other than planned refused up front (before: a stage failed
    # midway and the process group was lost for good); buffers() as parameters()
    attempt("features", lambda: cm(torch.randn(16, 9)))
    attempt("dtype", lambda: cm.step(x.double(), target=t, loss_fn=F.mse_loss))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # refused up front (before: lost the group midway)
        attempt("autocast", lambda: cm(x))
    attempt("trace", lambda: cm.step(x, target=t, loss_fn=F.mse_loss, trace=str(folder / "run.json")))
    attempt("usable", lambda: cm(x))
    record("buffers", mine=sorted(k for k, _ in cm.named_buffers()), n=len(list(cm.buffers())))

    # loss_fn failing on the last rank mid-step: the same error on both ranks within the
    # timeout, .grad as before, and the next step works (before: rank 0 timed out waiting for
    # gradients, both marked the group broken and refused every later call)
    model = _linears()
    ref = copy.deepcopy(model)
    cm = compile_(model, x, 2)
    cm.step(x, target=t, loss_fn=F.mse_loss)
    before = {k: q.grad.clone() for k, q in cm.named_parameters()}
    calls: list = []

    def raising(o, tt):
        calls.append(1)
        if len(calls) % 2 == 0:  # the second microbatch: the first one's backward may have run
            raise ValueError("no loss for this microbatch")
        return F.mse_loss(o, tt)

    bad = {"raises": raising, "nonscalar": lambda o, tt: F.mse_loss(o, tt, reduction="none"),
           "nontensor": lambda o, tt: F.mse_loss(o, tt).item(), "detached": lambda o, tt: F.mse_loss(o, tt).detach()}
    for name, fn in bad.items():
        attempt(f"loss_{name}", lambda: cm.step(x, target=t, loss_fn=fn))
        record(f"loss_{name}_grad", same=all(torch.equal(q.grad, before[k]) for k, q in cm.named_parameters()))
    loss = attempt("loss_after", lambda: cm.step(x, target=t, loss_fn=F.mse_loss))
    for _ in range(2):
        want = F.mse_loss(ref(x), t)
        want.backward()
    grads = dict(ref.named_parameters())
    record("loss_after_eq", loss=None if loss is None else loss.item(), want=want.item(),
           grad_err=max((q.grad - grads[k].grad).abs().max().item() for k, q in cm.named_parameters()))

    # the local CompiledModel's arguments (before: TypeError, no arguments taken)
    def surface():
        sd = cm.state_dict(prefix="m.", keep_vars=True)
        own = dict(model.named_parameters())
        return {"params": sorted(k for k, _ in cm.named_parameters(prefix="m")),
                "top": len(list(cm.parameters(recurse=False))), "buffers": len(list(cm.named_buffers(prefix="m"))),
                "sd": sorted(sd), "kept": sorted(k for k, v in sd.items() if v is own[k[2:]])}
    sf = attempt("surface", surface)
    record("surface_out", **(sf or {}))
    record("end")
    os._exit(0)  # no destroy: a broken group must not make exit hang


# ---- harness --------------------------------------------------------------------------------
def _launch(tmp_path: Path, world: int) -> list[dict]:
    return launch(__file__, tmp_path, world, LIMIT)


def test_batchnorm_modes_and_refusals_on_two_ranks(tmp_path):
    logs = _launch(tmp_path, 2)
    for rec in (0, 1):
        for r, ph in enumerate(logs):
            e = ph[f"bn{rec}"]
            assert e["warnings"] == (1 if r == 0 else 0), (r, e)  # once per job, not per rank
            assert e["recompute"] == [bool(rec)] * 2, e
        e = logs[0][f"bn{rec}"]
        assert e["moved"] > 1e-2, e  # the step did update the statistics
        assert e["sd_err"] < 1e-6 and e["ck_err"] < 1e-6 and e["call_sd_err"] < 1e-6, e
        assert logs[0][f"bn{rec}"]["call_out_err"] < 1e-5 and logs[1][f"bn{rec}"]["call_out_err"] < 1e-5
        for ph in logs:
            assert abs(ph[f"bn{rec}"]["loss"] - ph[f"bn{rec}"]["want_loss"]) < 1e-5, ph[f"bn{rec}"]

    for r, ph in enumerate(logs):
        assert ph["shared_stages"]["local"] == [r] and ph["shared_stages"]["users"] == 1, ph["shared_stages"]
        for phase in ("shared_step", "shared_call"):
            e = ph[phase]
            assert not e["ok"] and e["type"] == "RuntimeMismatchError", e
            assert "module 'bn' (BatchNorm1d) is used by more than one stage" in e["msg"] and "eval()" in e["msg"], e
        e = ph["shared_eval"]
        assert abs(e["loss"] - e["want"]) < 1e-5, e
    assert logs[0]["shared_eval"]["sd_err"] < 1e-6
    for r, ph in enumerate(logs):
        assert ph["export_stages"] == {"phase": "export_stages", "local": [r], "path": "export"}, ph["export_stages"]
        e = ph["export_step"]
        assert not e["ok"] and e["type"] == "RuntimeMismatchError" and "updated in place" in e["msg"], e
        assert "used by stages [0, 1]" in e["msg"], e

    for phase in ("mode_call", "mode_step"):
        e0, e1 = logs[0][phase], logs[1][phase]
        assert not e0["ok"] and e0["type"] == "RuntimeMismatchError" and "module '0' is in eval mode" in e0["msg"], e0
        assert not e1["ok"] and e1["type"] == "RuntimeMismatchError", e1
        assert "rank 0 refused this" in e1["msg"] and "module '0' is in eval mode" in e1["msg"], e1
        assert e1["s"] < TIMEOUT, e1  # told at once, not after a timeout
    for ph in logs:
        assert ph["mode_fixed"]["ok"] and ph["mode_out"]["err"] < 1e-6, ph["mode_out"]

    for ph in logs:
        e = ph["dropout"]
        assert e["local"] != 0 and abs(e["local"] - e["dist"]) < 1e-7 and e["grad_err"] < 1e-7 and e["n"] > 0, e
        assert e["next"][0] == e["next"][1], e  # the caller's generator advanced alike
    for r, ph in enumerate(logs):
        e = ph["submodule_mode"]
        assert not e["ok"] and e["type"] == "RuntimeMismatchError" and "made different calls" in e["msg"], e
        assert "train/eval mode (of every module)" in e["msg"], e
        e = ph["frozen"]
        assert not e["ok"] and "made different calls" in e["msg"] and "same parameters frozen" in e["msg"], e
        e = ph["bad_target"]
        assert not e["ok"] and e["type"] == "RuntimeMismatchError" and e["s"] < TIMEOUT, e
        assert ("batch size 16" in e["msg"]) and (r == 1 or "rank 1 refused this step" in e["msg"]), e
        assert ph["after"]["ok"], ph["after"]  # refusals leave the group usable
        for phase, what in (("features", "shape (16, 9)"), ("dtype", "dtype torch.float64")):
            e = ph[phase]
            assert not e["ok"] and e["type"] == "RuntimeMismatchError" and what in e["msg"], e
            assert "only the batch size may change" in e["msg"], e
        e = ph["autocast"]
        assert not e["ok"] and e["type"] == "RuntimeMismatchError" and "torch.autocast" in e["msg"], e
        e = ph["trace"]  # before: "this call does not fit Sequential.forward(...)" (taken as a model input)
        assert not e["ok"] and e["type"] == "RuntimeMismatchError" and "local backend only" in e["msg"], e
        assert ph["usable"]["ok"], ph["usable"]
        assert ph["buffers"]["n"] == len(ph["buffers"]["mine"])
    mine = logs[0]["buffers"]["mine"] + logs[1]["buffers"]["mine"]
    assert sorted(mine) == sorted(k for k, _ in _bn_model().named_buffers())

    for name, what in (("raises", "raised ValueError: no loss for this microbatch"), ("nonscalar", "shape (8, 4)"),
                       ("nontensor", "returned float"), ("detached", "does not require grad")):
        msgs = set()
        for r, ph in enumerate(logs):
            e = ph[f"loss_{name}"]
            assert not e["ok"] and e["type"] == "RuntimeMismatchError", (r, e)
            assert "loss_fn" in e["msg"] and "rank 1" in e["msg"] and what in e["msg"], (r, e)
            assert e["s"] < TIMEOUT, (r, e)  # told at once, not after a timeout
            assert ph[f"loss_{name}_grad"]["same"], (r, name)
            msgs.add(e["msg"])
        assert len(msgs) == 1, msgs  # the same error on every rank
    for ph in logs:
        assert ph["loss_after"]["ok"], ph["loss_after"]
        e = ph["loss_after_eq"]
        assert abs(e["loss"] - e["want"]) < 1e-6 and e["grad_err"] < 1e-6, e

    for r, ph in enumerate(logs):
        assert ph["surface"]["ok"], ph["surface"]
        e = ph["surface_out"]
        assert e["params"] and all(k.startswith("m.") for k in e["params"]) and e["top"] == 0, e
        assert e["buffers"] == 0, e
        assert e["sd"] == ([f"m.{k}" for k in sorted(_linears().state_dict())] if r == 0 else []), e
        # rank 0's own parameters as themselves (keep_vars), the others' copies
        assert e["kept"] == (sorted(logs[0]["surface_out"]["params"]) if r == 0 else []), e


if __name__ == "__main__":
    try:
        _worker(sys.argv[1], int(sys.argv[2]))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
