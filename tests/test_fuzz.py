"""Property tests over random inputs (hypothesis, the derandomized "ci" profile of conftest.py).

* Random DAG-shaped models (branches, joins, skip connections, not only chains) compiled on
  1-4 CPU devices with random microbatch counts and schedules compute what eager computes:
  outputs, loss and every parameter's `.grad`.
* Their plans round-trip through `to_dict`/`from_dict` and through a file.
* Randomly damaged plan files (keys dropped, values of the wrong type, negative numbers,
  strings for numbers, null, truncated text) raise PlanError from `Plan.load` and nothing
  else; a damaged file that still loads is a plan whose summary and schedule work.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxpipe
from fxpipe import Plan, PlanError

__all__: list[str] = []

WIDTH = 8
TOL = dict(rtol=1e-4, atol=1e-5)


# ---- random DAG models --------------------------------------------------------------------------


class RandomDAG(nn.Module):
    """Node i (i = 1..n) reads the sum of the values listed in preds[i-1] (0 is the input),
    applies Linear(WIDTH, WIDTH), then ReLU if relu[i-1]. The output is the sum of every node
    no later node reads, so every node counts. All widths are equal, so any adjacency is valid."""

    def __init__(self, preds: list[tuple[int, ...]], relu: list[bool]):
        super().__init__()
        self.preds = [tuple(p) for p in preds]
        self.relu = list(relu)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in preds)
        read = {j for p in self.preds for j in p}
        self.sinks = [i for i in range(1, len(preds) + 1) if i not in read]

    def forward(self, x):
        vals = [x]
        for layer, preds, relu in zip(self.layers, self.preds, self.relu):
            h = vals[preds[0]]
            for j in preds[1:]:
                h = h + vals[j]
            h = layer(h)
            vals.append(torch.relu(h) if relu else h)
        out = vals[self.sinks[0]]
        for j in self.sinks[1:]:
            out = out + vals[j]
        return out


@st.composite
def dag_cases(draw):
    n = draw(st.integers(2, 6))
    preds = []
    for i in range(1, n + 1):
        # mostly the previous node (a chain), plus random earlier ones: skips and joins
        extra = draw(st.lists(st.integers(0, i - 1), max_size=2, unique=True))
        first = i - 1 if draw(st.booleans()) else draw(st.integers(0, i - 1))
        preds.append(tuple(dict.fromkeys([first, *extra])))
    relu = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    p = draw(st.integers(1, min(4, n)))
    batch = draw(st.integers(2, 7))
    m = draw(st.integers(1, min(4, batch)))
    schedule = draw(st.sampled_from(["gpipe", "1f1b"]))
    seed = draw(st.integers(0, 2**16))
    return preds, relu, p, batch, m, schedule, seed


def _fxpipe_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fxpipe-device-") and t.is_alive()]


@settings(settings.get_profile("ci"), max_examples=20)
@given(dag_cases())
def test_random_dag_equals_eager_and_plan_round_trips(case):
    preds, relu, p, batch, m, schedule, seed = case
    torch.manual_seed(seed)
    model = RandomDAG(preds, relu)
    ref = copy.deepcopy(model)
    x, t = torch.randn(batch, WIDTH), torch.randn(batch, WIDTH)
    cm = fxpipe.compile(model, ["cpu"] * p, example_inputs=(x,), microbatches=m, schedule=schedule)
    assert cm.plan.num_stages == p and cm.plan.microbatches == m

    with torch.no_grad():
        torch.testing.assert_close(cm(x), ref(x), **TOL)
    loss = cm.step(x, target=t, loss_fn=F.mse_loss)
    ref_loss = F.mse_loss(ref(x), t)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **TOL)
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    for name, w in want.items():
        g = got[name].grad
        if w.grad is None:
            assert g is None or not g.any(), name
        else:
            assert g is not None, f"{name} has no .grad after step"
            torch.testing.assert_close(g, w.grad, **TOL, msg=lambda s: f"{name}: {s}")
    assert not _fxpipe_threads()

    # the plan round-trips: in memory, through JSON text, and through a file
    plan = cm.plan
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).to_dict() == plan.to_dict()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "plan.json"
        plan.save(path)
        assert Plan.load(path, fingerprint=plan.fingerprint) == plan
        assert sorted(q.name for q in Path(d).iterdir()) == ["plan.json"]  # no .tmp left behind


# ---- damaged plan files -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _plan_text() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    plan = fxpipe.plan(model, ["cpu"] * 3, example_inputs=(torch.randn(6, 8),), microbatches=3)
    return json.dumps(plan.to_dict(), indent=1)


_REPLACEMENTS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.just(-1.5), st.just(1e308), st.just(float("nan")),
    st.just(float("inf")), st.text(max_size=5), st.just("12"), st.just(10**30),
    # containers are built fresh per draw: a shared instance could be inserted into itself
    st.builds(list), st.builds(dict), st.builds(lambda: [1, "a"]), st.builds(lambda: {"x": 1}),
)


def _containers(value, path=()):
    """Every (path, container) in a JSON value, the root first."""
    if isinstance(value, (dict, list)):
        yield path, value
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            yield from _containers(v, path + (k,))


@st.composite
def damaged_plans(draw):
    text = _plan_text()
    how = draw(st.sampled_from(["drop", "replace", "number", "truncate", "several"]))
    if how == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    data = json.loads(text)
    for _ in range(draw(st.integers(2, 4)) if how == "several" else 1):
        places = [(p, c) for p, c in _containers(data) if c]
        path, box = draw(st.sampled_from(places))
        key = draw(st.sampled_from(sorted(box) if isinstance(box, dict) else range(len(box))))
        if how == "drop" or (how == "several" and draw(st.booleans())):
            del box[key]
        elif how == "number" and isinstance(box[key], (int, float)) and not isinstance(box[key], bool):
            v = box[key]
            box[key] = draw(st.sampled_from([str(v), -v - 1, None, v + 0.5, -1e-9, True, [v]]))
        else:
            box[key] = draw(_REPLACEMENTS)
    return json.dumps(data)


@settings(settings.get_profile("ci"), max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_plans())
def test_damaged_plan_file_raises_only_plan_error(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "plan.json"
        path.write_text(text)
        try:
            plan = Plan.load(path)
        except PlanError as e:
            assert str(path) in str(e)  # the message says which file
            return
    # a damage that still loads (a number changed within its range) is a working plan
    plan.summary()
    plan.check()
    assert Plan.from_dict(plan.to_dict()) == plan
    assert all(math.isfinite(s.fwd_ms) for s in plan.stages)
