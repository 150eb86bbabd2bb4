"""Launch a test file as N gloo ranks and collect each rank's phase log.

The test files that use it (test_dist_user.py, test_dist_modes.py) are their own worker
script: run as `python FILE cfg.json RANK`, each rank reads the config, appends phases to
`dir/rank{r}.json` and ends with a phase named "end". Not a test module itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["free_port", "launch", "rank_setup"]

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, tmp_path: Path, world: int, limit: float, **cfg: object) -> list[dict]:
    """Every rank's phases by name; every process is gone when this returns. `cfg` entries
    join the config file next to world, port and dir."""
    from fxpipe.compiler.cluster import cpu_calibration

    cpu_calibration()  # cached on disk first, so every rank plans alike
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"world": world, "port": free_port(), "dir": str(tmp_path), **cfg}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, script, str(path), str(r)], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / f"rank{r}.err", "w")) for r in range(world)]
    t0 = time.monotonic()
    try:
        for p in procs:
            p.wait(timeout=max(1.0, limit - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = []
    for r in range(world):
        f = tmp_path / f"rank{r}.json"
        assert f.exists(), (tmp_path / f"rank{r}.err").read_text()[-3000:]
        phases = {e["phase"]: e for e in json.loads(f.read_text())}
        assert "end" in phases, (r, list(phases), (tmp_path / f"rank{r}.err").read_text()[-3000:])
        logs.append(phases)
    return logs


def rank_setup(cfg_path: str, rank: int) -> tuple[dict, Callable[..., None], Callable[[str, Callable[[], Any]], Any]]:
    """Worker side: (config, record, attempt). Sets the torch.distributed environment of
    `rank`; `record(phase, **fields)` appends a phase to `dir/rank{r}.json` (rewritten each
    time, so a killed rank leaves what it reached); `attempt(phase, fn)` runs fn and records
    whether it raised (type, message) and how long it took, returning its value or None."""
    cfg = json.loads(Path(cfg_path).read_text())
    out = Path(cfg["dir"]) / f"rank{rank}.json"
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(cfg["port"]), "RANK": str(rank),
                       "WORLD_SIZE": str(cfg["world"]), "LOCAL_RANK": str(rank)})
    log: list = []

    def record(phase: str, **kw: Any) -> None:
        log.append({"phase": phase, **kw})
        out.write_text(json.dumps(log))

    def attempt(phase: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            v = fn()
            record(phase, ok=True, s=time.monotonic() - t0)
            return v
        except Exception as e:
            record(phase, ok=False, type=type(e).__name__, msg=str(e), s=time.monotonic() - t0)
            return None

    return cfg, record, attempt
