"""Reading a plan's JSON form field by field: every failure a PlanError naming the field.

`Plan.from_dict` builds a plan from a file that may be damaged or edited by hand, so each
field is checked for presence, type and range before use (`_Fields`), and each nested part
(stages, cost table, shared tensors, predictions, baselines) has its own reader here. Kept
apart from plan.py, which holds what a plan is; this module holds how its file is checked.
"""

from __future__ import annotations

import math
from dataclasses import MISSING
from typing import TYPE_CHECKING, Any

from fxpipe.compiler.cluster import Cluster
from fxpipe.errors import FxpipeError, PlanError
from fxpipe.passes.annotate_costs import CostTable, SharedTensor

if TYPE_CHECKING:
    from fxpipe.compiler.plan import StagePlan

__all__: list[str] = []


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Fields:
    """Typed access to the fields of a plan's JSON form; every failure is a PlanError naming the field."""

    def __init__(self, where: str):
        self.where = where

    def get(self, d: dict, key: str, prefix: str = "") -> Any:
        if not isinstance(d, dict):
            raise PlanError(f"{prefix.rstrip('.') or 'the plan'} must be an object, got {_show(d)}")
        if key not in d:
            raise PlanError(f"field '{prefix}{key}' is missing")
        return d[key]

    def keys(self, d: Any, prefix: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        if not isinstance(d, dict):
            raise PlanError(f"'{prefix.rstrip('.')}' must be an object, got {_show(d)}")
        missing = [k for k in required if k not in d]
        if missing:
            raise PlanError(f"field(s) {', '.join(repr(prefix + k) for k in missing)} missing")
        extra = sorted(str(k) for k in d if k not in required and k not in optional)
        if extra:
            raise PlanError(f"unknown field(s) {', '.join(repr(prefix + k) for k in extra)}")

    def _fail(self, name: str, want: str, v: Any) -> PlanError:
        return PlanError(f"field '{name}' must be {want}, got {_show(v)}")

    def string(self, d: dict, key: str, prefix: str = "") -> str:
        v = self.get(d, key, prefix)
        if not isinstance(v, str) or not v:
            raise self._fail(prefix + key, "a non-empty string", v)
        return v

    def choice(self, d: dict, key: str, options: tuple[str, ...], prefix: str = "") -> str:
        v = self.get(d, key, prefix)
        if v not in options or not isinstance(v, str):
            raise self._fail(prefix + key, f"one of {', '.join(map(repr, options))}", v)
        return v

    def strings(self, d: dict, key: str, prefix: str = "") -> list[str]:
        v = self.get(d, key, prefix)
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) and x for x in v):
            raise self._fail(prefix + key, "a non-empty list of names", v)
        return v

    def integer(self, d: dict, key: str, prefix: str = "", low: int = 0) -> int:
        v = self.get(d, key, prefix)
        if not _is_int(v) or v < low:
            raise self._fail(prefix + key, f"an integer >= {low}", v)
        return v

    def number(self, d: dict, key: str, prefix: str = "") -> float:
        v = self.get(d, key, prefix)
        return self.value(v, prefix + key)

    def value(self, v: Any, name: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise self._fail(name, "a finite number >= 0", v)
        return v

    def boolean(self, d: dict, key: str, prefix: str = "") -> bool:
        v = self.get(d, key, prefix)
        if not isinstance(v, bool):
            raise self._fail(prefix + key, "true or false", v)
        return v

    def items(self, d: dict, key: str, prefix: str = "") -> list:
        v = self.get(d, key, prefix)
        if not isinstance(v, (list, tuple)) or not v:
            raise self._fail(prefix + key, "a non-empty list", v)
        return v

    def mapping(self, d: dict, key: str, prefix: str = "") -> dict:
        v = self.get(d, key, prefix)
        if not isinstance(v, dict):
            raise self._fail(prefix + key, "an object", v)
        return v

    def numbers(self, v: Any, name: str, length: int | None = None, integers: bool = False) -> tuple:
        if not isinstance(v, (list, tuple)) or (length is not None and len(v) != length):
            raise self._fail(name, "a list of numbers" + (f" with {length} entries" if length is not None else ""), v)
        for i, x in enumerate(v):
            if integers and not _is_int(x):
                raise self._fail(f"{name}[{i}]", "an integer >= 0", x)
            self.value(x, f"{name}[{i}]")
        return tuple(v)


def _show(v: Any) -> str:
    text = repr(v)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(v).__name__})"


def _nested(build: Any, data: Any, name: str) -> Any:
    """Run a nested from_dict (cluster, schedule); its message already names the field."""
    try:
        return build(data, name) if build is Cluster.from_dict else build(data)
    except PlanError:
        raise
    except FxpipeError as e:  # ScheduleError: the schedule part of a plan is the plan's problem
        raise PlanError(str(e)) from None


def _stage_from_dict(r: _Fields, s: Any, name: str) -> StagePlan:
    from fxpipe.compiler.plan import StagePlan  # at call time: plan.py imports this module

    late = ("recompute", "offload")  # fields added later: older plan files lack them
    r.keys(s, name + ".", required=tuple(k for k in StagePlan.__slots__ if k not in late), optional=late)
    pre = name + "."
    units = s["units"]
    if not (isinstance(units, (list, tuple)) and len(units) == 2 and all(_is_int(u) and u >= 0 for u in units)):
        raise PlanError(f"field '{pre}units' must be [start, end] unit indices, got {_show(units)}")
    return StagePlan(
        index=r.integer(s, "index", pre), device=r.integer(s, "device", pre), units=(units[0], units[1]),
        param_bytes=r.number(s, "param_bytes", pre), fwd_ms=r.number(s, "fwd_ms", pre),
        bwd_ms=r.number(s, "bwd_ms", pre), send_ms=r.number(s, "send_ms", pre),
        send_bytes=r.number(s, "send_bytes", pre), memory_bytes=r.number(s, "memory_bytes", pre),
        inflight=r.integer(s, "inflight", pre), recompute=r.boolean(s, "recompute", pre) if "recompute" in s else False,
        offload=r.boolean(s, "offload", pre) if "offload" in s else False)


def _costs_from_dict(r: _Fields, c: Any) -> CostTable:
    fields = tuple(CostTable.__dataclass_fields__)
    # fields added later have defaults: plans written before them still load
    optional = tuple(k for k, f in CostTable.__dataclass_fields__.items() if f.default is not MISSING)
    r.keys(c, "costs.", required=tuple(k for k in fields if k not in optional), optional=optional)
    names = r.strings(c, "unit_names", "costs.")
    n = len(names)
    out: dict[str, Any] = {"unit_names": tuple(names)}
    for k in fields:
        if k == "unit_names" or k not in c:
            continue
        if k in optional and c[k] == []:
            continue  # how to_dict writes a field that a plan from before it lacked: still absent
        if k == "shared":
            out[k] = tuple(_shared_from_dict(r, x, f"costs.shared[{i}]", n) for i, x in enumerate(r.items(c, k, "costs.")))
        elif k.startswith("node_"):
            v = c[k]
            if not isinstance(v, (list, tuple)) or len(v) != n:
                raise PlanError(f"field 'costs.{k}' must be a list of {n} lists (one per unit), got {_show(v)}")
            out[k] = tuple(r.numbers(x, f"costs.{k}[{u}]") for u, x in enumerate(v))
        else:
            out[k] = r.numbers(c[k], f"costs.{k}", n - 1 if k == "boundary_bytes" else n, integers=k == "launches")
    for u, (a, b) in enumerate(zip(out["node_flops"], out["node_bytes"])):
        if len(a) != len(b):
            raise PlanError(f"fields 'costs.node_flops[{u}]' and 'costs.node_bytes[{u}]' differ in length")
    return CostTable(**out)


def _shared_from_dict(r: _Fields, x: Any, name: str, n: int) -> SharedTensor:
    r.keys(x, name + ".", required=("bytes", "trainable_bytes", "units"))
    units = r.numbers(x["units"], f"{name}.units", integers=True)
    if len(units) < 2 or any(not 0 <= u < n for u in units) or list(units) != sorted(set(units)):
        raise PlanError(f"field '{name}.units' must list at least two distinct unit indices in 0..{n - 1}, "
                        f"ascending, got {_show(x['units'])}")
    return SharedTensor(r.number(x, "bytes", name + "."), r.number(x, "trainable_bytes", name + "."), tuple(units))


def _predicted_from_dict(r: _Fields, p: Any) -> dict[str, Any]:
    if not isinstance(p, dict):
        raise PlanError(f"field 'predicted' must be an object, got {_show(p)}")
    out = dict(p)
    for k in ("step_ms", "bottleneck_ms", "bubble"):
        out[k] = r.number(p, k, "predicted.")
    for k in ("bubble_per_device", "peak_memory_bytes"):
        if k in p:
            out[k] = list(r.numbers(p[k], f"predicted.{k}"))
    if "auto" in p:  # the candidates auto mode compared (explain_plan lists them)
        if not isinstance(p["auto"], list):
            raise PlanError(f"field 'predicted.auto' must be a list of candidates, got {_show(p['auto'])}")
        for i, c in enumerate(p["auto"]):
            pre = f"predicted.auto[{i}]."
            r.keys(c, pre, required=("schedule", "microbatches", "fits"), optional=("step_ms", "recompute_stages", "offload_stages", "why",
                                                                             "skipped", "lower_bound_ms"))
            r.string(c, "schedule", pre)
            r.integer(c, "microbatches", pre, low=1)
            if r.boolean(c, "fits", pre) or "step_ms" in c:
                r.number(c, "step_ms", pre)
            for k in ("recompute_stages", "offload_stages"):
                if k in c:
                    r.integer(c, k, pre)
            if "lower_bound_ms" in c:
                r.number(c, "lower_bound_ms", pre)
            if "skipped" in c:
                r.boolean(c, "skipped", pre)
            if "why" in c and not isinstance(c["why"], str):
                raise PlanError(f"field '{pre}why' must be a string, got {_show(c['why'])}")
    return out


def _baselines_from_dict(r: _Fields, b: Any) -> dict[str, Any]:
    if not isinstance(b, dict):
        raise PlanError(f"field 'baselines' must be an object, got {_show(b)}")
    for name, v in b.items():
        pre = f"baselines.{name}."
        r.keys(v, pre, required=("bottleneck_ms", "fits"), optional=("bounds", "recompute", "offload", "step_ms"))
        r.number(v, "bottleneck_ms", pre)
        if "step_ms" in v:
            r.number(v, "step_ms", pre)
        r.boolean(v, "fits", pre)
        for k in ("recompute", "offload"):
            if k in v and not (isinstance(v[k], list) and all(isinstance(x, bool) for x in v[k])):
                raise PlanError(f"field '{pre}{k}' must be a list of true/false per stage, got {_show(v[k])}")
        bounds = v.get("bounds", [])
        if not isinstance(bounds, (list, tuple)) or not all(
                isinstance(x, (list, tuple)) and len(x) == 2 and all(_is_int(u) for u in x) for x in bounds):
            raise PlanError(f"field '{pre}bounds' must be a list of [start, end] pairs, got {_show(bounds)}")
    return dict(b)

