"""`keep_freed_memory()` (runtime/distributed.py): after it, a CPU training loop whose
microbatches allocate and free 16 MiB weight gradients stops page-faulting.

Run in a child process: the setting is process-wide and must not leak into the test run.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, torch
from torch import nn
from fxpipe.runtime.distributed import keep_freed_memory
ok = keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))  # 16 MiB weight grads
x = torch.randn(64, 1024)
def step():
    for xb in x.tensor_split(4):
        model(xb).square().mean().backward()
for _ in range(6):  # reach the step's high-water mark (3 steps fell short in ~1 run of 12)
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(json.dumps({"ok": ok, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_stops_page_faults_in_the_microbatch_loop():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] is True
    # 3 steps x 4 microbatches x two fresh 16 MiB gradients would be ~98k faults if the
    # blocks went back to the kernel; kept on the heap they are reused (a few stray pages)
    assert res["faults"] < 1024, res
