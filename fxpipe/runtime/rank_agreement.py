"""Cross-rank agreement for `DistributedCompiledModel`: every rank must run the same plan
and make the same call, and a refusal or failure on one rank must be an error on all.

Held here, apart from the model (runtime/dist_model.py), as the mixin `RankAgreement`:
* at compile time, `_check_same_plan` compares digests of the traced model, the example
  inputs and devices, the plan and a sample of the weights across ranks, and lets ranks
  that planned otherwise adopt rank 0's plan (`_adopt_plan_of_rank0`);
* per call, `_agree_on_call` compares the call (kind, input shapes and dtypes, every
  module's train/eval mode, frozen parameters) and whether each rank's own checks passed;
* `_agree` spreads one rank's failure to all; `_collective` turns a failed collective into
  a `PipelineFailure` and marks this rank broken, after which `_check_usable` refuses
  every later collective.

The mixin reads the model's attributes: `model`, `plan`, `_cap`, `rank`, `world`, `_ctrl`
(fxpipe's gloo group), `_rebuild`, `_values_differ` and `_broken`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.distributed as dist

from fxpipe.errors import FxpipeError, PlanError, RuntimeMismatchError
from fxpipe.passes.propagate_shapes import VAL
from fxpipe.runtime.distributed import PipelineFailure

__all__ = ["RankAgreement"]


class RankAgreement:
    """Mixin of `DistributedCompiledModel`: ranks agree on the plan and on every call (see
    the module docstring)."""

    @staticmethod
    def _digest(obj: Any) -> int:
        return int.from_bytes(hashlib.sha256(repr(obj).encode()).digest()[:7], "little")

    def _plan_digest(self) -> int:
        p = self.plan
        return self._digest(([s.units for s in p.stages], [s.device for s in p.stages], p.microbatches, p.schedule.kind,
                             [[str(i) for i in prog] for prog in p.schedule.programs], p.fingerprint))

    def _input_shapes(self) -> list[str]:
        # the graph's shapes are a microbatch's; the batch size tells 30 from 32 samples in 4 microbatches
        return [f"batch {self._cap.batch_size}", f"devices {sorted(d.name for d in self.plan.cluster.devices)}"] + [
            f"{n.name}: {tuple(v.shape)} {v.dtype}" if isinstance(v := n.meta.get(VAL), torch.Tensor)
            else f"{n.name}: {v!r}"
            for n in self._cap.gm.graph.nodes if n.op == "placeholder"]

    def _values_digest(self) -> int:
        """A cheap digest of the model's parameters (a few strided samples each): ranks that
        built the model from different seeds hold different weights, which the plan check
        cannot see (the plan depends on shapes only). Meta tensors count by shape only.
        Buffers are left out: one made with torch.empty and filled by forward differs
        between processes harmlessly."""
        parts = []
        for k, t in self.model.named_parameters():
            if t.is_meta or t.numel() == 0:
                parts.append((k, tuple(t.shape)))
                continue
            flat = t.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(16, flat.numel()), device=flat.device).long()
            parts.append((k, bytes(flat[idx].cpu().contiguous().view(torch.uint8).numpy())))  # any dtype, exact
        return self._digest(parts)

    def _check_same_plan(self) -> None:
        """Every rank must trace the same model with the same example inputs and plan alike;
        compare the three (and the model's values) so the error names what differs."""
        mine = torch.tensor([self._digest(self.plan.fingerprint), self._digest(self._input_shapes()),
                             self._plan_digest(), self._values_digest()], dtype=torch.int64)
        allv = [torch.zeros(4, dtype=torch.int64) for _ in range(self.world)]
        self._collective(lambda: dist.all_gather(allv, mine, group=self._ctrl), "checking that every rank has the same plan")
        if self._rebuild is not None and len({int(v[2].item()) for v in allv}) > 1 and \
                len({(int(v[0].item()), int(v[1].item())) for v in allv}) == 1:
            # the same model, inputs and devices planned otherwise (each rank measured its own
            # CPU or profiled itself): every rank runs rank 0's plan
            self._adopt_plan_of_rank0(int(allv[0][2].item()))
            mine[2] = self._plan_digest()
            self._collective(lambda: dist.all_gather(allv, mine, group=self._ctrl),
                             "checking that every rank has the same plan")

        def groups(i: int) -> list[list[int]] | None:
            by: dict[int, list[int]] = {}
            for r, v in enumerate(allv):
                by.setdefault(int(v[i].item()), []).append(r)
            return sorted(by.values()) if len(by) > 1 else None

        if (g := groups(0)) is not None:
            raise PlanError(f"the ranks traced different models (graph fingerprints differ; ranks grouped by model: "
                            f"{g}): every rank must build the same model (same code, config and constructor arguments)")
        if (g := groups(1)) is not None:
            raise PlanError(f"the ranks compiled with different example inputs or devices (ranks grouped by them: {g}; "
                            f"rank {self.rank}'s: {self._input_shapes()[:5]}): give every rank the same example_inputs "
                            "and devices (the boundary messages are laid out from the inputs' shapes)")
        if (g := groups(2)) is not None:
            raise PlanError(f"the ranks planned differently (ranks grouped by plan: {g}); "
                            "planning must be the same on every rank: plan once (fxpipe.plan(...).save('plan.json')) "
                            "and give every rank that plan file")
        if (g := groups(3)) is not None:
            # not an error yet: loading a checkpoint or state dict next makes them agree
            self._values_differ = (
                f"the ranks built the model with different values (ranks grouped by weights: {g}), so its stages "
                "would not form one model; call torch.manual_seed(same seed) before building the model on every "
                "rank, or call cm.load_checkpoint(folder) / cm.load_state_dict(sd) on every rank first")

    def _adopt_plan_of_rank0(self, digest0: int) -> None:
        from fxpipe.compiler.plan import Plan

        obj = [self.plan.to_dict() if self.rank == 0 else None]
        self._collective(lambda: dist.broadcast_object_list(obj, src=0, group=self._ctrl), "receiving rank 0's plan")
        err: BaseException | None = None
        if self._plan_digest() != digest0:
            try:
                comp = self._rebuild(Plan.from_dict(obj[0], "rank 0's plan"))
                self.plan, self._cap = comp.plan, comp.captured
            except FxpipeError as e:
                err = e
        self._agree(err, "adopting rank 0's plan")

    def _agree_on_call(self, kind: str, args: tuple, kwargs: dict, check: Callable[[], Any]) -> Any:
        """Run this rank's checks of a call (`check`, whose result is returned) and agree with
        every other rank that all passed and that all make the same call: kind, input shapes,
        dtypes and requires_grad, every module's train/eval mode and every parameter's
        requires_grad. A rank that calls differently would otherwise post other messages than
        its peers (gloo aborts the process on a size mismatch) or none at all, and a rank
        whose checks refuse the call alone would leave its peers' call to be paired with its
        next one. So a refusal on any rank is raised on every rank (the same error type, naming
        the rank), before any message of the call; the group stays usable. One tiny all_gather
        on the host per call (plus one more after a refusal); a rank that never calls times
        out on it."""
        err: BaseException | None = None
        result, sig = None, None
        try:
            if self._values_differ is not None:
                raise PlanError(self._values_differ)
            result = check()
            flat = self._cap.flat_inputs(args, kwargs)
            sig = (kind, [(tuple(t.shape), str(t.dtype), bool(t.requires_grad)) for t in flat],
                   self.model.training, [m.training for m in self.model.modules()],
                   [q.requires_grad for q in self.model.parameters()])
        except Exception as e:  # any rank's refusal must reach every rank: none may run the call alone
            err = e
        mine = torch.tensor([self._digest(sig), 0 if err is None else 1], dtype=torch.int64)
        allv = [torch.zeros(2, dtype=torch.int64) for _ in range(self.world)]
        self._collective(lambda: dist.all_gather(allv, mine, group=self._ctrl),
                         f"checking that every rank makes the same call ({kind}); every rank must call it together")
        refused = [r for r, v in enumerate(allv) if v[1].item()]
        if refused:
            why = [None] * self.world
            own = None if err is None else (type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self._collective(lambda: dist.all_gather_object(why, own, group=self._ctrl),
                             f"learning why rank{'s' if len(refused) > 1 else ''} {refused} refused the call")
            if err is not None:
                raise err
            import fxpipe.errors

            name, msg = why[refused[0]]
            cls = getattr(fxpipe.errors, name, None)
            cls = cls if isinstance(cls, type) and issubclass(cls, FxpipeError) else RuntimeMismatchError
            raise cls(f"rank {refused[0]} refused this {kind} call, so no rank ran it ({name}: {msg})")
        by: dict[int, list[int]] = {}
        for r, v in enumerate(allv):
            by.setdefault(int(v[0].item()), []).append(r)
        if len(by) > 1:
            raise RuntimeMismatchError(
                f"the ranks made different calls (ranks grouped by call: {sorted(by.values())}; rank {self.rank}: "
                f"{kind} with inputs {[s for s, _, _ in sig[1]]}, {'train' if sig[2] else 'eval'} mode): every rank "
                "must call step / cm(...) together, with inputs of the same shapes, in the same train/eval mode "
                "(of every module) and with the same parameters frozen")
        return result

    def _check_usable(self) -> None:
        """After a step, call or collective failed midway, peers may still be blocked in it or
        have its messages in flight, which the next step's receives (same tags) would take as
        its own: refuse every later collective on this rank rather than hang or mix steps."""
        if self._broken is not None:
            raise PipelineFailure(f"rank {self.rank}: an earlier step or collective failed midway ({self._broken}); "
                                  "the process group is no longer in step across ranks: exit the process on every "
                                  "rank and restart (torchrun restarts the job; resume from a checkpoint)")

    def _mark_broken(self, e: BaseException) -> None:
        if self._broken is None:
            self._broken = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

    def _collective(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except FxpipeError as e:
            self._mark_broken(e)
            raise
        except Exception as e:
            self._mark_broken(e)
            raise PipelineFailure(f"rank {self.rank} failed while {what}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300] if str(e) else ''} (a peer died or is stuck)") from None

    def _agree(self, error: BaseException | None, what: str) -> None:
        """Every rank learns whether any rank failed `what`; all raise if one did."""
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        allv = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._collective(lambda: dist.all_gather(allv, flag, group=self._ctrl), what)
        bad = [r for r, v in enumerate(allv) if v.item()]
        if error is not None:
            raise error
        if bad:
            raise RuntimeMismatchError(f"rank{'s' if len(bad) > 1 else ''} {bad} failed while {what} (see "
                                       f"{'their' if len(bad) > 1 else 'its'} error); rank {self.rank} stopped too")
