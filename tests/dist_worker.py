"""One rank of a distributed test (spawned by tests/test_distributed.py).

    python tests/dist_worker.py CONFIG.json RANK

The config names the world size, the port, where to write results, and a list of cases;
each case builds its model from a fixed seed (the test process builds the same reference),
plans it the same way on every rank, runs one `step` (and inference), and records the loss,
this rank's gradients (by parameter name), the outputs and rank 0's gathered state_dict.
`fault` makes one rank die (os._exit) or hang just before its first send in the case it
names, to test that the others fail within the timeout. Results: RESULT_DIR/rank{r}.pt
(rewritten after every case), the error of a failed case as text in rank{r}.err (first line:
seconds since that case started).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

VOCAB, SEQ = 64, 8
STEP_T0: float | None = None  # when the running case's step started (the fault tests time the failure)


def make_mlp(batch: int):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(4)],
                          nn.Linear(16, 4))
    x = torch.randn(batch, 16)
    t = torch.randn(batch, 4)
    return model, (x,), {}, t, F.mse_loss


def lm_loss(out, t):
    return F.cross_entropy(out.logits.flatten(0, 1), t.flatten())


def make_gpt2(batch: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, use_cache=False,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, VOCAB, (batch, SEQ))
    am = torch.ones(batch, SEQ, dtype=torch.long)
    am[:2, SEQ - 3:] = 0
    return model, (), {"input_ids": ids, "attention_mask": am}, ids, lm_loss


class TiedLM(nn.Module):
    """A tiny language model with an input embedding tied to the output head and a persistent
    buffer: the checkpoint tests' model (the tie spans the first and last stage's ranks)."""

    def __init__(self, d: int = 16, blocks: int = 4, inv_freq: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
                                      for _ in range(blocks)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(0.5))
        if inv_freq:  # like a rotary embedding's: not in the state dict
            self.register_buffer("inv_freq", torch.arange(d, dtype=torch.float32) / d, persistent=False)

    def forward(self, ids):
        h = self.emb(ids) * self.scale
        if hasattr(self, "inv_freq"):
            h = h + self.inv_freq
        return self.head(self.norm(self.blocks(h)))


def tied_loss(out, t):
    return F.cross_entropy(out.flatten(0, 1), t.flatten())


def make_tied(batch: int, seed: int = 0, meta: bool = False, inv_freq: bool = False):
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            model = TiedLM(inv_freq=inv_freq)
    else:
        model = TiedLM(inv_freq=inv_freq)
    g = torch.Generator().manual_seed(1234)  # the data do not depend on the model's seed
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    return model, (ids,), {}, ids.roll(-1, 1), tied_loss


MODELS = {"mlp": make_mlp, "gpt2": make_gpt2, "tied": make_tied}


def wait_for(path: Path, other: str | None, limit: float = 150.0) -> None:
    """Wait until another run's checkpoint is complete (its index is written last); give up
    when that run failed (a rank{r}.err in its result folder `other`)."""
    t0 = time.monotonic()
    while not path.exists():
        failed = list(Path(other).glob("*.err")) if other else []
        if failed or time.monotonic() - t0 > limit:
            raise TimeoutError(f"{path} did not appear ({'the run writing it failed' if failed else f'{limit}s'})")
        time.sleep(0.05)


def _compile(model, args, case: dict, world: int):
    import fxpipe

    return fxpipe.compile(model, ["cpu"] * world, args, microbatches=case["microbatches"],
                          schedule=case.get("schedule", "1f1b"), timeout=case.get("timeout", 90),
                          backend="distributed")


def _real_bytes(model) -> int:
    ts = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in ts.values() if not t.is_meta)


def _snapshot(sd: dict) -> dict:
    # like nn.Module.state_dict, rank 0's own entries are its live tensors: later steps change them
    return {k: v.clone() for k, v in sd.items()}


def run_checkpoint_case(case: dict, rank: int) -> dict:
    """The checkpoint cases (case["kind"]):

    save: a real model trains one step (SGD) and saves a sharded checkpoint to case["save"].
    load: a real model from another seed loads case["load"] (saved under another plan), after
        refusing case["refuse"] (a checkpoint of another model).
    meta: a meta-device model loads case["load"], reports its real bytes, trains one step,
        saves to case["save"].
    nonpersistent: a meta model with a non-persistent buffer: the error compile raises.
    """
    from fxpipe.errors import FxpipeError
    from fxpipe.runtime.checkpoint import INDEX_NAME

    world = int(os.environ["WORLD_SIZE"])
    kind = case["kind"]
    meta = kind in ("meta", "nonpersistent")
    model, args, _, target, loss_fn = make_tied(case["batch"], seed=case.get("seed", 0), meta=meta,
                                                inv_freq=kind == "nonpersistent")
    if kind == "nonpersistent":
        try:
            _compile(model, args, case, world)
        except FxpipeError as e:
            return {"error": f"{type(e).__name__}: {e}"}
        return {"error": None}
    full = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                                                       list(model.parameters()) + list(model.buffers())}.values())
    cm = _compile(model, args, case, world)
    res: dict = {"full_bytes": full, "real_bytes": _real_bytes(model), "local_stages": cm.local_stages,
                 "params": [k for k, _ in cm.named_parameters()],
                 "param_bytes": sum(q.numel() * q.element_size() for q in cm.parameters())
                 + sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)}
    if meta:
        try:
            cm.step(*args, target=target, loss_fn=loss_fn)
        except FxpipeError as e:
            res["unloaded_error"] = str(e)
    if "refuse" in case:  # a checkpoint of another model: every rank refuses it, nothing changes
        try:
            cm.load_checkpoint(case["refuse"])
            res["refused"] = None
        except FxpipeError as e:
            res["refused"] = f"{type(e).__name__}: {e}"
    if "load" in case:
        wait_for(Path(case["load"]) / INDEX_NAME, case.get("other"))
        cm.load_checkpoint(case["load"])
        res["loaded_sd"] = _snapshot(cm.state_dict())
    if kind in ("save", "meta"):
        opt = torch.optim.SGD(cm.parameters(), lr=0.5)
        res["loss"] = cm.step(*args, target=target, loss_fn=loss_fn).detach().clone()
        res["grads"] = {k: q.grad.clone() for k, q in cm.named_parameters()}
        opt.step()
        res["saved_sd"] = _snapshot(cm.state_dict())
        cm.save_checkpoint(case["save"])
    return res


def run_case(case: dict, rank: int, fault: dict | None) -> dict:
    if "kind" in case:
        return run_checkpoint_case(case, rank)
    return _run_case(case, rank, fault)


def _run_case(case: dict, rank: int, fault: dict | None) -> dict:
    from fxpipe.compiler.pipeline import build_plan
    from fxpipe.runtime import distributed
    from fxpipe.runtime.dist_model import DistributedCompiledModel

    model, args, kwargs, target, loss_fn = MODELS[case["model"]](case["batch"])
    world = int(os.environ["WORLD_SIZE"])
    t0 = time.monotonic()
    if case.get("via_compile"):  # the public entry point: fxpipe.compile(..., backend="distributed")
        import fxpipe

        cm = fxpipe.compile(model, ["cpu"] * world, args or None, example_kwargs=kwargs or None,
                            microbatches=case["microbatches"], schedule=case["schedule"],
                            timeout=case.get("timeout", 90), backend="distributed")
        t1 = t2 = time.monotonic()
    else:
        comp = build_plan(model, ["cpu"] * world, args or None, kwargs or None, microbatches=case["microbatches"],
                          schedule=case["schedule"], recompute=case.get("recompute", "auto"),
                          offload=case.get("offload", "auto"))
        t1 = time.monotonic()
        cm = DistributedCompiledModel(model, comp, timeout=case.get("timeout", 90))
        t2 = time.monotonic()
    if fault is not None and fault["rank"] == rank:
        orig = distributed.DistRuntime._send

        sends = [0]

        def faulty(self, dst, key, values, what):
            sends[0] += 1
            if sends[0] <= fault.get("after_sends", 0):  # die mid-step: after this many sends
                return orig(self, dst, key, values, what)
            if fault["kind"] == "die":
                os._exit(17)
            time.sleep(fault.get("seconds", 60))
            return orig(self, dst, key, values, what)

        distributed.DistRuntime._send = faulty
    global STEP_T0
    STEP_T0 = time.monotonic()
    loss = cm.step(*args, target=target, loss_fn=loss_fn, **kwargs)
    t3 = time.monotonic()
    if os.environ.get("FXPIPE_WORKER_TIMES"):
        print(f"rank {rank}: plan {t1 - t0:.2f}s build {t2 - t1:.2f}s step {t3 - t2:.2f}s", file=sys.stderr, flush=True)
    grads = {k: q.grad.clone() for k, q in cm.named_parameters() if q.grad is not None}
    sd = cm.state_dict()
    out = cm(*args, **kwargs)
    if hasattr(out, "logits"):
        out = out.logits
    return {"loss": loss.detach().clone(), "grads": grads, "state_dict": sd, "output": out.detach().clone(),
            "local_stages": cm.local_stages, "params": [k for k, _ in cm.named_parameters()],
            "recompute": [st.recompute for st in cm.plan.stages],
            # stages whose weights this rank streamed, and how many unit fetches that took
            "streamed": {s: len(st.stats.fetches) for s, st in getattr(getattr(cm, "_rt", None), "streamers", {}).items()}}


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    rank = int(sys.argv[2])
    out_dir = Path(cfg["result_dir"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]), RANK=str(rank),
                      WORLD_SIZE=str(cfg["world"]))
    torch.set_num_threads(1)
    if cfg.get("preinit"):  # else DistributedCompiledModel initializes the group from the environment
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=cfg["world"], timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for name, case in cfg["cases"].items():
            t0 = t1 = time.monotonic()
            global STEP_T0
            STEP_T0 = None
            fault = cfg.get("fault")
            results[name] = run_case(case, rank, fault if fault and fault.get("case") == name else None)
            torch.save(results, out_dir / f"rank{rank}.pt")  # what is done survives a later failing case
            if os.environ.get("FXPIPE_WORKER_TIMES"):
                print(f"rank {rank} {name}: {time.monotonic() - t1:.2f}s", file=sys.stderr, flush=True)
    except BaseException as e:  # the test reads the error and how long it took
        now = time.monotonic()
        step = f"step_seconds={now - STEP_T0:.3f}\n" if STEP_T0 is not None else ""
        (out_dir / f"rank{rank}.err").write_text(f"{now - t0:.2f}\n{type(e).__name__}: {e}\n{step}"
                                                 f"{traceback.format_exc()}")
        os._exit(1)
    os._exit(0)  # no destroy_process_group: a failed peer must not make exit hang


if __name__ == "__main__":
    main()
