"""This rank's share of the model's tensors for `DistributedCompiledModel`: meta tensors
given memory (only those this rank's stages use), the state dict gathered to rank 0 or
loaded on every rank, and sharded checkpoints (runtime/checkpoint.py) saved and loaded.

Held here, apart from the model (runtime/dist_model.py), as the mixin `RankState`: which
rank owns which tensor and when its values are loaded is one concern, running the pipeline
another. It reads the model's attributes: `model`, `plan`, `rank`, `world`, `device`,
`_table` (checkpoint.tensor_table), `_users` (id(tensor) -> ranks whose stages use it),
`_host_ids`, `_unloaded`, `_values_differ`, `_data` and `_mine`; and the collectives of
`RankAgreement` (`_agree`, `_collective`, `_check_usable`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fxpipe.errors import FxpipeError, PlanError, RuntimeMismatchError
from fxpipe.runtime.checkpoint import (INDEX_NAME, check_compatible, copy_into, make_index, read_index,
                                       read_tensors, remove_stale_shards, write_index, write_shard)
from fxpipe.runtime.distributed import BoundaryLayout

__all__ = ["RankState"]


class RankState:
    """Mixin of `DistributedCompiledModel`: this rank's tensors, state dict and checkpoints
    (see the module docstring)."""

    def _materialize(self, used: dict[int, torch.Tensor]) -> None:
        """Give this rank's meta tensors real (uninitialized) memory on its device, in place.

        A model built on the meta device is planned whole, but each rank allocates only the
        tensors its stages use (rank 0 also those no stage uses, so a checkpoint keeps them);
        every other tensor stays on meta. `torch.utils.swap_tensors` keeps each tensor's
        identity, so tied parameters stay tied and the optimizer sees the model's own objects.
        The values come from `load_checkpoint` / `load_state_dict`; until then `step` refuses."""
        # checked over every stage (not only this rank's), so all ranks refuse alike, before any collective
        in_sd = {id(t) for t in self._table.tensors.values()}
        names = {id(t): k for k, t in list(self.model.named_parameters(remove_duplicate=False))
                 + list(self.model.named_buffers(remove_duplicate=False))}
        lost = sorted({names.get(i, "a graph constant") for i, t in used.items() if t.is_meta and i not in in_sd})
        if lost:
            raise PlanError(
                f"{lost[:5]} {'is' if len(lost) == 1 else 'are'} on the meta device but not in the "
                "model's state_dict (non-persistent buffers, e.g. rotary inv_freq, are never in a checkpoint), so "
                "no checkpoint can fill them and fxpipe does not guess how the model computes them: give them "
                "real values before compiling (e.g. rebuild the buffer on the CPU and assign it to the module)")
        mine = [t for i, t in used.items() if self.rank in self._users[i]]
        if self.rank == 0:
            mine += [t for t in self._table.tensors.values() if id(t) not in self._users]
        meta = {id(t): t for t in mine if t.is_meta}
        for i, t in meta.items():
            where = "cpu" if i in self._host_ids else self.device
            real = torch.empty(t.shape, dtype=t.dtype, device=where)
            if isinstance(t, nn.Parameter):
                real = nn.Parameter(real, requires_grad=t.requires_grad)
            torch.utils.swap_tensors(t, real)
            self._unloaded.add(i)

    def _check_loaded(self, what: str) -> None:
        if self._unloaded:
            names = [k for k, t in self._table.tensors.items() if id(t) in self._unloaded]
            raise RuntimeMismatchError(
                f"rank {self.rank} cannot {what}: {len(self._unloaded)} of its tensors were allocated from the meta "
                f"device and hold no values yet (e.g. {names[:3]}); call cm.load_checkpoint(folder) or "
                "cm.load_state_dict(sd) on every rank first")

    def _owner(self, t: torch.Tensor) -> int:
        rs = self._users.get(id(t))
        return min(rs) if rs else 0

    def _needed(self) -> list[str]:
        """The state_dict keys whose tensors live on this rank (rank 0: also those no stage uses)."""
        return [k for k, t in self._table.tensors.items()
                if self._mine(t) or (self.rank == 0 and id(t) not in self._users)]

    def state_dict(self, *, destination: dict[str, Any] | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """The original model's state dict on rank 0 (each tensor from its owner rank); {} elsewhere.

        Every rank must call it (it is a collective). `destination`, `prefix` and `keep_vars`
        as `nn.Module.state_dict`; with keep_vars=True rank 0's own tensors are the model's
        (Parameters, not detached), those gathered from other ranks are copies."""
        self._check_usable()
        self._check_loaded("gather the state dict")
        objs = self._table.tensors
        sd = self.model.state_dict(keep_vars=keep_vars)
        per_rank: dict[int, list[str]] = {}
        for k, c in self._table.canonical.items():
            if k == c:
                per_rank.setdefault(self._owner(objs[k]), []).append(k)
        gathered: dict[str, torch.Tensor] = {}
        for r in range(1, self.world):
            ks = per_rank.get(r, [])
            if not ks:
                continue
            lay = BoundaryLayout([objs[k].detach() for k in ks], f"state of rank {r}")
            if self.rank == r:
                buf = lay.pack([objs[k].detach() for k in ks], self.device).clone()
                self._collective(lambda: dist.send(buf, dst=0, group=self._data), "sending its state to rank 0")
            elif self.rank == 0:
                buf = lay.empty(self.device)
                self._collective(lambda: dist.recv(buf, src=r, group=self._data), f"receiving the state of rank {r}")
                for k, v in zip(ks, lay.unpack(buf)):
                    gathered[k] = v.clone()
        out = {} if destination is None else destination
        if self.rank != 0:
            return out
        out.update((prefix + k, gathered.get(self._table.canonical[k], v) if k in objs else v) for k, v in sd.items())
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Load a full state dict, given on every rank; each rank copies only the tensors its
        stages use (in place). strict: missing or unexpected keys raise RuntimeMismatchError."""
        from torch.nn.modules.module import _IncompatibleKeys

        objs = self._table.tensors
        extra = set(self.model.state_dict(keep_vars=True)) - set(objs)  # non-tensor extra state
        missing = [k for k in objs if k not in sd]
        unexpected = [k for k in sd if k not in objs and k not in extra]
        if strict and (missing or unexpected):
            raise RuntimeMismatchError(f"the state dict does not fit {type(self.model).__name__}: missing keys "
                                       f"{missing[:5]} ({len(missing)}), unexpected keys {unexpected[:5]} "
                                       f"({len(unexpected)}); pass strict=False to load the keys that match")
        for k in self._needed():
            if k in sd:
                copy_into(objs[k], sd[k])
                self._unloaded.discard(id(objs[k]))
        self._values_differ = None  # every rank loads the same state dict (the contract above)
        return _IncompatibleKeys(missing, unexpected)

    def save_checkpoint(self, folder: str | os.PathLike) -> None:
        """Write a sharded checkpoint (runtime/checkpoint.py): every rank writes the tensors it
        owns (the lowest rank whose stages use a tensor; rank 0 also those no stage uses) under
        their original keys to its own file, then rank 0 writes the index. A collective: call
        it on every rank; `folder` must be one every rank sees. When it returns, on any rank,
        the checkpoint is complete."""
        self._check_usable()
        self._check_loaded("save a checkpoint")
        folder = Path(folder)
        n = self.world
        objs, canon = self._table.tensors, self._table.canonical
        owner = {k: self._owner(objs[k]) for k in objs if canon[k] == k}
        err: BaseException | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if self.rank == 0:  # a folder whose save did not finish has no index
                (folder / INDEX_NAME).unlink(missing_ok=True)
        except OSError as e:
            err = FxpipeError(f"rank {self.rank} cannot create the checkpoint folder {folder}: {e.strerror or e}")
        self._agree(err, f"preparing checkpoint folder {folder}")
        try:
            write_shard(folder, self.rank, n, {k: objs[k] for k, r in owner.items() if r == self.rank})
        except FxpipeError as e:
            err = e
        self._agree(err, f"writing its shard of checkpoint {folder}")
        if self.rank == 0:
            try:
                index = make_index(self._table, owner, n, self.plan.fingerprint, type(self.model).__name__, n)
                remove_stale_shards(folder, index.files)
                write_index(folder, index)
            except FxpipeError as e:
                err = e
        self._agree(err, f"writing the index of checkpoint {folder}")

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Load a checkpoint saved under any plan and device count (or by the local
        CompiledModel): each rank reads the index and only the tensors its stages use,
        memory-mapped, from whichever files hold them. A checkpoint of another model (graph
        fingerprint, keys, shapes, dtypes) is refused on every rank before anything changes.
        A collective: call it on every rank."""
        self._check_usable()
        err: BaseException | None = None
        values: dict[str, torch.Tensor] = {}
        try:
            index = read_index(folder)
            check_compatible(index, self._table, self.plan.fingerprint, folder, type(self.model).__name__)
            values = read_tensors(folder, index, self._needed())
        except FxpipeError as e:
            err = e
        self._agree(err, f"loading checkpoint {os.fspath(folder)!r}")
        self._values_differ = None
        for k, v in values.items():
            t = self._table.tensors[k]
            copy_into(t, v)
            self._unloaded.discard(id(t))
