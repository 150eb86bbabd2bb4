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


MODELS = {"mlp": make_mlp, "gpt2": make_gpt2}


def run_case(case: dict, rank: int, fault: dict | None) -> dict:
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
                          schedule=case["schedule"])
        t1 = time.monotonic()
        cm = DistributedCompiledModel(model, comp, timeout=case.get("timeout", 90))
        t2 = time.monotonic()
    if fault is not None and fault["rank"] == rank:
        orig = distributed.DistRuntime._send

        def faulty(self, dst, key, values, what):
            if fault["kind"] == "die":
                os._exit(17)
            time.sleep(fault.get("seconds", 60))
            return orig(self, dst, key, values, what)

        distributed.DistRuntime._send = faulty
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
            "local_stages": cm.local_stages, "params": [k for k, _ in cm.named_parameters()]}


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
            fault = cfg.get("fault")
            results[name] = run_case(case, rank, fault if fault and fault.get("case") == name else None)
            torch.save(results, out_dir / f"rank{rank}.pt")  # what is done survives a later failing case
            if os.environ.get("FXPIPE_WORKER_TIMES"):
                print(f"rank {rank} {name}: {time.monotonic() - t1:.2f}s", file=sys.stderr, flush=True)
    except BaseException as e:  # the test reads the error and how long it took
        (out_dir / f"rank{rank}.err").write_text(f"{time.monotonic() - t0:.2f}\n{type(e).__name__}: {e}\n"
                                                 f"{traceback.format_exc()}")
        os._exit(1)
    os._exit(0)  # no destroy_process_group: a failed peer must not make exit hang


if __name__ == "__main__":
    main()
