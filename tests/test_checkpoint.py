"""Sharded checkpoints across plans, meta-device models, and a rank killed mid-step.

Two gloo runs start together (tests/dist_worker.py) and hand checkpoints to each other
through the filesystem:

* 2 ranks (`save`): a real TiedLM (embedding tied to the head across the first and last
  rank) trains one SGD step and saves a sharded checkpoint A.
* 3 ranks (`meta`): the same model built on the meta device compiles (each rank allocates
  only its stages' tensors), loads A (saved under the 2-device plan), trains one step, saves B.
* 2 ranks (`load`): a real model from another seed loads B (saved under the 3-device plan).
* 3 ranks, last: a meta model with a non-persistent buffer is refused; then rank 1 dies
  (os._exit) after its second send, mid-step, and ranks 0 and 2 must fail naming rank 1 and
  the instruction they waited on, within the configured timeout.

The local (one-process) CompiledModel's checkpoints are tested in-process.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import fxpipe
from fxpipe.errors import FxpipeError, PlanError, RuntimeMismatchError
from fxpipe.runtime.checkpoint import INDEX_NAME, read_index, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker  # noqa: E402
from test_distributed import Run  # noqa: E402

from test_equivalence import GRAD_TOL, LOSS_TOL  # noqa: E402

KILL_TIMEOUT = 8.0


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    a, b = base / "A", base / "B"
    w2, w3 = base / "w2", base / "w3"
    other = base / "other"  # a checkpoint of another model (3 blocks, another graph)
    save_model(dist_worker.TiedLM(blocks=3), other, fingerprint="0" * 64, devices=1)
    cases2 = {"save": {"kind": "save", "batch": 8, "microbatches": 2, "save": str(a)},
              "load": {"kind": "load", "batch": 8, "microbatches": 2, "load": str(b), "seed": 1, "other": str(w3),
                       "refuse": str(other)}}
    cases3 = {"meta": {"kind": "meta", "batch": 8, "microbatches": 3, "load": str(a), "save": str(b),
                       "other": str(w2)},
              "nonpersistent": {"kind": "nonpersistent", "batch": 8, "microbatches": 3},
              "kill": {"model": "mlp", "batch": 8, "microbatches": 4, "schedule": "1f1b", "timeout": KILL_TIMEOUT}}
    fault = {"rank": 1, "kind": "die", "after_sends": 2, "case": "kill"}
    runs = {}
    try:
        runs[2] = Run(2, cases2, w2, limit=200)
        runs[3] = Run(3, cases3, w3, fault=fault, limit=200)
        done = {w: r.finish() for w, r in runs.items()}
    finally:
        for r in runs.values():
            r.kill()
    yield {"A": a, "B": b, **done}


def _results(ck, world: int, case: str) -> list[dict]:
    results, errors, _ = ck[world]
    for r, res in enumerate(results):
        assert res is not None and case in res, f"rank {r} of {world} has no {case!r} result:\n{errors[r]}"
    return [res[case] for res in results]


def _assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: keys differ: {set(got) ^ set(want)}"
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{what}: {k!r} differs"


def test_round_trip_2_to_3_to_2_is_bitwise(ck):
    save2 = _results(ck, 2, "save")
    meta3 = _results(ck, 3, "meta")
    load2 = _results(ck, 2, "load")
    saved_a = save2[0]["saved_sd"]
    init = dist_worker.make_tied(8)[0].state_dict()
    assert not torch.equal(saved_a["blocks.0.0.weight"], init["blocks.0.0.weight"])  # the step changed it
    assert saved_a.keys() == init.keys()
    # A on disk is what the 2-rank run gathered; the 3-rank plan loaded exactly that
    _assert_bitwise(fxpipe.load_checkpoint(ck["A"]), saved_a, "checkpoint A on disk")
    _assert_bitwise(meta3[0]["loaded_sd"], saved_a, "A loaded under the 3-device plan")
    # and back: B (3 devices, after another step) into a 2-device plan of a model from another seed
    saved_b = meta3[0]["saved_sd"]
    assert not torch.equal(saved_b["norm.weight"], saved_a["norm.weight"])
    _assert_bitwise(fxpipe.load_checkpoint(ck["B"]), saved_b, "checkpoint B on disk")
    _assert_bitwise(load2[0]["loaded_sd"], saved_b, "B loaded under the 2-device plan")
    for res in save2[1:] + meta3[1:] + load2[1:]:
        assert res.get("saved_sd", {}) == {} and res.get("loaded_sd", {}) == {}  # gathered to rank 0 only


def test_distributed_load_refuses_another_models_checkpoint_on_every_rank(ck):
    for r, res in enumerate(_results(ck, 2, "load")):
        assert res["refused"] is not None, r
        assert res["refused"].startswith("RuntimeMismatchError") and "graph fingerprint" in res["refused"], res
        # the load after the refusal worked (checked bitwise in the round trip test)
        assert r > 0 or res["loaded_sd"]


def test_checkpoint_layout_one_file_per_rank_tied_written_once(ck):
    for folder, n in ((ck["A"], 2), (ck["B"], 3)):
        index = read_index(folder)
        assert index.devices == n and len(index.files) == n
        assert sorted(p.name for p in Path(folder).glob("shard-*.pt")) == list(index.files)
        assert index.entries["head.weight"].key == "emb.weight"  # the tie: stored once, by rank 0
        assert index.entries["emb.weight"].file == index.files[0]
        stored = [k for f in index.files for k in torch.load(Path(folder) / f, weights_only=True)]
        assert len(stored) == len(set(stored)) and "head.weight" not in stored
        assert set(stored) == set(index.entries) - {"head.weight"}
        assert index.entries["blocks.0.0.weight"].shape == (32, 16) and index.entries["scale"].dtype == "float32"
    # the last block belongs to the last rank's stage in both plans
    a, b = read_index(ck["A"]), read_index(ck["B"])
    assert a.entries["norm.weight"].file == a.files[1] and b.entries["norm.weight"].file == b.files[2]


def test_meta_model_materializes_only_its_own_stages(ck):
    meta3 = _results(ck, 3, "meta")
    full = meta3[0]["full_bytes"]
    emb = dist_worker.VOCAB * 16 * 4
    for r, res in enumerate(meta3):
        # every real byte on the rank is one of its own stages' tensors, and no rank holds the model
        assert res["real_bytes"] == res["param_bytes"] < full, (r, res["real_bytes"], full)
        assert res["local_stages"] == [r]
        assert "cannot train" in res["unloaded_error"] and "load_checkpoint" in res["unloaded_error"]
    # together they hold the model once, plus the tied embedding's second copy on the last rank
    assert sum(res["real_bytes"] for res in meta3) == full + emb
    # the loss and gradients equal eager's on the real model loaded from the same checkpoint
    model, args, _, target, loss_fn = dist_worker.make_tied(8, seed=3)
    model.load_state_dict(fxpipe.load_checkpoint(ck["A"]))
    loss = loss_fn(model(*args), target)
    loss.backward()
    grads = dict(model.named_parameters())
    for r, res in enumerate(meta3):
        torch.testing.assert_close(res["loss"], loss.detach(), **LOSS_TOL)
        assert res["grads"].keys() == set(res["params"])
        for k, g in res["grads"].items():
            torch.testing.assert_close(g, grads[k].grad, **GRAD_TOL, msg=lambda m: f"rank {r} grad {k}: {m}")


def test_non_persistent_meta_buffer_is_refused_on_every_rank(ck):
    for res in _results(ck, 3, "nonpersistent"):
        assert res["error"] is not None and res["error"].startswith("PlanError")
        assert "['inv_freq']" in res["error"] and "non-persistent" in res["error"]


def test_killed_rank_fails_the_others_within_timeout(ck):
    results, errors, _ = ck[3]
    assert errors[1] is None and "kill" not in results[1]  # it died by os._exit: no error of its own
    for r in (0, 2):
        err = errors[r]
        assert err is not None and "PipelineFailure" in err, err
        line = err.splitlines()[1]
        # the instruction it waited on, and the dead rank, by number
        assert re.match(rf"PipelineFailure: rank {r} failed on (RECV_ACT|RECV_GRAD|SEND_ACT|SEND_GRAD)"
                        rf"\(s\d,mb\d(<-|->)d1\) \((waiting for|sending to) rank 1\): rank 1 ", line), line
        secs = float(re.search(r"step_seconds=([\d.]+)", err).group(1))
        assert secs < KILL_TIMEOUT, (r, secs)


# ---- the local (one-process) CompiledModel ---------------------------------------------------

def _local(devices: int, seed: int = 0, mb: int = 2):
    model, args, _, target, loss_fn = dist_worker.make_tied(8, seed=seed)
    return fxpipe.compile(model, ["cpu"] * devices, args, microbatches=mb), args, target, loss_fn


def test_local_checkpoint_across_plans(tmp_path):
    cm2, args, target, loss_fn = _local(2)
    opt = torch.optim.SGD(cm2.parameters(), lr=0.5)
    cm2.step(*args, target=target, loss_fn=loss_fn)
    opt.step()
    cm2.save_checkpoint(tmp_path / "c")
    assert read_index(tmp_path / "c").devices == 2
    cm3, *_ = _local(3, seed=1, mb=3)
    assert not torch.equal(cm3.state_dict()["emb.weight"], cm2.state_dict()["emb.weight"])
    cm3.load_checkpoint(tmp_path / "c")
    _assert_bitwise(cm3.state_dict(), cm2.state_dict(), "local 2 -> 3")
    assert cm3.model.head.weight is cm3.model.emb.weight  # the tie survives loading
    # state_dict / load_state_dict across plans too
    cm3b, *_ = _local(3, seed=2, mb=3)
    cm3b.load_state_dict(cm2.state_dict())
    _assert_bitwise(cm3b.state_dict(), cm2.state_dict(), "local load_state_dict 2 -> 3")
    # and the loaded plan computes what the saved one would
    l2 = cm2.step(*args, target=target, loss_fn=loss_fn)
    l3 = cm3.step(*args, target=target, loss_fn=loss_fn)
    torch.testing.assert_close(l3, l2, **LOSS_TOL)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    cm, args, _, _ = _local(2)
    cm.save_checkpoint(tmp_path / "c")
    before = {k: v.clone() for k, v in cm.state_dict().items()}
    # another graph (no tie, different blocks) with the same parameter names is another model
    other = dist_worker.TiedLM(blocks=3)
    cm_other = fxpipe.compile(other, ["cpu", "cpu"], args, microbatches=2)
    with pytest.raises(RuntimeMismatchError, match="graph fingerprint"):
        cm_other.load_checkpoint(tmp_path / "c")
    # missing keys are named, shapes are checked (fingerprint check skipped: keys alone)
    from fxpipe.runtime.checkpoint import load_into_model

    with pytest.raises(RuntimeMismatchError, match=r"unexpected keys \['blocks\.3\.0\.weight'"):
        load_into_model(other, tmp_path / "c", None)
    with pytest.raises(RuntimeMismatchError, match=r"'emb.weight' is \[64, 16\] float32 there but \[64, 8\]"):
        load_into_model(dist_worker.TiedLM(d=8), tmp_path / "c", None)
    with pytest.raises(FxpipeError, match="not an fxpipe checkpoint"):
        cm.load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FxpipeError, match=f"is a file; .*pass '{tmp_path / 'c'}'"):
        cm.load_checkpoint(tmp_path / "c" / INDEX_NAME)
    (tmp_path / "c" / INDEX_NAME).write_text("{broken")
    with pytest.raises(FxpipeError, match="damaged"):
        cm.load_checkpoint(tmp_path / "c")
    _assert_bitwise(cm.state_dict(), before, "a refused load changes nothing")


def test_local_compile_of_meta_model_is_a_clear_error():
    model, args, _, _, _ = dist_worker.make_tied(8, meta=True)
    with pytest.raises(PlanError, match="meta device"):
        fxpipe.compile(model, ["cpu", "cpu"], args, microbatches=2)
