"""Sharded checkpoints: one file per rank plus an index, loadable under any plan.

A checkpoint is a folder:

    fxpipe-index.json           written last (by rank 0): what is where
    shard-00000-of-00002.pt     rank 0's tensors, under their original state_dict keys
    shard-00001-of-00002.pt     rank 1's tensors

The index maps every state_dict key of the model to the file and the key it is stored
under, with its shape and dtype, and records the plan's graph fingerprint and device count.
Tied tensors (GPT-2's `lm_head.weight` is `transformer.wte.weight`) are stored once, by their
owner (the lowest rank whose stages use them); the other keys point at that entry. A reader
needs only the index and the files that hold its own keys, and reads them memory-mapped, so a
rank that loads one stage never reads the whole model into memory.

Files are written with `torch.save` and read with `torch.load(weights_only=True, mmap=True)`.
Optimizer state is not part of a checkpoint (save it per rank with the optimizer's own
`state_dict`; its parameters are `cm.parameters()` of that rank and plan).

    >>> cm.save_checkpoint("ckpt")                 # every rank  # doctest: +SKIP
    >>> cm2.load_checkpoint("ckpt")                # any plan     # doctest: +SKIP
    >>> sd = fxpipe.load_checkpoint("ckpt")        # a plain full state dict  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from fxpipe.errors import FxpipeError, RuntimeMismatchError

__all__ = ["INDEX_NAME", "CheckpointIndex", "Entry", "TensorTable", "tensor_table", "shard_name", "write_shard",
           "write_index", "read_index", "check_compatible", "read_tensors", "load_checkpoint", "save_model",
           "load_into_model", "remove_stale_shards", "make_index", "copy_into"]

INDEX_NAME = "fxpipe-index.json"
FORMAT = "fxpipe.checkpoint"
VERSION = 1
_SHARD = re.compile(r"shard-\d{5}-of-\d{5}\.pt")


def shard_name(rank: int, n: int) -> str:
    """The file rank `rank` of `n` writes."""
    return f"shard-{rank:05d}-of-{n:05d}.pt"


@dataclass(frozen=True, slots=True)
class Entry:
    """Where one state_dict key lives: `file` holds it under `key` (another key when tied)."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"


@dataclass(frozen=True, slots=True)
class CheckpointIndex:
    """The contents of fxpipe-index.json."""

    fingerprint: str
    devices: int
    model_name: str
    files: tuple[str, ...]
    entries: dict[str, Entry]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "devices": self.devices,
                "model_name": self.model_name, "files": list(self.files),
                "tensors": {k: {"file": e.file, "key": e.key, "shape": list(e.shape), "dtype": e.dtype}
                            for k, e in self.entries.items()}}


@dataclass(frozen=True, slots=True)
class TensorTable:
    """A model's state_dict keys and the tensor objects behind them.

    `tensors` maps every tensor key of `model.state_dict()` to the parameter/buffer object
    itself (which may still be on the meta device); `canonical` maps each key to the first key
    of the same object, so tied tensors are stored once."""

    tensors: dict[str, torch.Tensor]
    canonical: dict[str, str]


def tensor_table(model: nn.Module) -> TensorTable:
    """The persistent parameters and buffers of `model` by state_dict key (see TensorTable)."""
    objs: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    objs.update(dict(model.named_buffers(remove_duplicate=False)))
    # state_dict() leaves out non-persistent buffers: exactly the keys a checkpoint can have
    keys = [k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)]
    tensors = {k: objs[k] for k in keys if k in objs}
    first: dict[int, str] = {}
    canonical = {k: first.setdefault(id(t), k) for k, t in tensors.items()}
    return TensorTable(tensors, canonical)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _atomic_save(obj: Any, path: Path, what: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            torch.save(obj, tmp)
        else:
            tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FxpipeError(f"cannot write {what} {path}: {e.strerror or e}; check that the folder exists, is "
                          "writable and has space") from None


def write_shard(folder: str | os.PathLike, rank: int, n: int, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write rank `rank`'s tensors (detached, on the CPU, each with its own storage) to its shard file."""
    out = {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        # torch.save writes a view's whole storage: keep only the tensor's own bytes
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        out[k] = t
    name = shard_name(rank, n)
    _atomic_save(out, Path(folder) / name, f"checkpoint shard of rank {rank}")
    return name


def write_index(folder: str | os.PathLike, index: CheckpointIndex) -> None:
    """Write the index (last: a folder with an index is a complete checkpoint)."""
    _atomic_save(index.to_json(), Path(folder) / INDEX_NAME, "checkpoint index")


def remove_stale_shards(folder: str | os.PathLike, keep: Iterable[str]) -> None:
    """Delete shard files of an earlier checkpoint in the same folder that this one does not use."""
    keep = set(keep)
    for p in Path(folder).iterdir():
        if _SHARD.fullmatch(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)


def make_index(table: TensorTable, owner: Mapping[str, int], n: int, fingerprint: str, model_name: str,
               devices: int) -> CheckpointIndex:
    """The index of a checkpoint in which canonical key k is written by rank owner[k] of n
    (`devices`: the plan's device count, recorded for the reader)."""
    entries = {}
    for k, t in table.tensors.items():
        c = table.canonical[k]
        entries[k] = Entry(shard_name(owner[c], n), c, tuple(t.shape), _dtype_name(t.dtype))
    files = tuple(sorted({e.file for e in entries.values()} | {shard_name(r, n) for r in range(n)}))
    return CheckpointIndex(fingerprint, devices, model_name, files, entries)


def read_index(folder: str | os.PathLike) -> CheckpointIndex:
    """Read and validate a checkpoint folder's index; FxpipeError when it is missing or damaged."""
    if Path(folder).is_file():
        hint = Path(folder).parent if Path(folder).name == INDEX_NAME or Path(folder).suffix == ".pt" else None
        raise FxpipeError(f"{os.fspath(folder)!r} is a file; a checkpoint is the folder cm.save_checkpoint wrote"
                          + (f": pass {os.fspath(hint)!r}" if hint is not None else ""))
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        what = "does not exist" if not Path(folder).exists() else f"has no {INDEX_NAME}"
        raise FxpipeError(f"{os.fspath(folder)!r} is not an fxpipe checkpoint: the folder {what} (a save that was "
                          "interrupted leaves no index); save one with cm.save_checkpoint(folder)")
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"format {d.get('format')!r} version {d.get('version')!r}, expected {FORMAT!r} {VERSION}")
        entries = {k: Entry(str(e["file"]), str(e["key"]), tuple(int(x) for x in e["shape"]), str(e["dtype"]))
                   for k, e in d["tensors"].items()}
        index = CheckpointIndex(str(d["fingerprint"]), int(d["devices"]), str(d.get("model_name", "")),
                                tuple(d["files"]), entries)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FxpipeError(f"checkpoint index {path} is damaged ({type(e).__name__}: {e}); "
                          "save the checkpoint again") from None
    for k, e in entries.items():
        if e.file not in index.files or not isinstance(getattr(torch, e.dtype, None), torch.dtype):
            raise FxpipeError(f"checkpoint index {path} is damaged: key {k!r} names file {e.file!r} / "
                              f"dtype {e.dtype!r}; save the checkpoint again")
    return index


def check_compatible(index: CheckpointIndex, table: TensorTable, fingerprint: str | None, folder: str | os.PathLike,
                     model_name: str) -> None:
    """Refuse (RuntimeMismatchError) a checkpoint of another model: graph fingerprint, keys, shapes, dtypes."""
    where = f"checkpoint {os.fspath(folder)!r} (saved from {index.model_name or 'a model'} on {index.devices} devices)"
    if fingerprint is not None and index.fingerprint != fingerprint:
        raise RuntimeMismatchError(
            f"{where} is of another model: its graph fingerprint {index.fingerprint[:12]}... differs from this "
            f"{model_name}'s {fingerprint[:12]}...; load it into the model it was saved from, or load it by keys "
            "alone with model.load_state_dict(fxpipe.load_checkpoint(folder)) before compiling")
    missing = [k for k in table.tensors if k not in index.entries]
    unexpected = [k for k in index.entries if k not in table.tensors]
    if missing or unexpected:
        raise RuntimeMismatchError(
            f"{where} does not fit {model_name}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)}); it was saved from another model")
    for k, t in table.tensors.items():
        e = index.entries[k]
        if e.shape != tuple(t.shape) or e.dtype != _dtype_name(t.dtype):
            raise RuntimeMismatchError(f"{where}: {k!r} is {list(e.shape)} {e.dtype} there but {list(t.shape)} "
                                       f"{_dtype_name(t.dtype)} in {model_name}; it was saved from another "
                                       "configuration of the model")


def read_tensors(folder: str | os.PathLike, index: CheckpointIndex, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors of `keys` (on the CPU), each file opened once, memory-mapped: only the
    bytes of the requested tensors are read from disk."""
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(index.entries[k].file, []).append(k)
    out: dict[str, torch.Tensor] = {}
    for name, ks in sorted(by_file.items()):
        path = Path(folder) / name
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise FxpipeError(f"cannot read checkpoint file {path} ({type(e).__name__}: {str(e)[:200]}); every rank "
                              "must see the checkpoint folder (a shared filesystem), and the save must have "
                              "finished") from None
        for k in ks:
            e = index.entries[k]
            t = data.get(e.key) if isinstance(data, dict) else None
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != e.shape or _dtype_name(t.dtype) != e.dtype:
                raise FxpipeError(f"checkpoint file {path} does not hold {e.key!r} as its index says "
                                  f"({list(e.shape)} {e.dtype}); the checkpoint is damaged or mixed with another")
            out[k] = t
    return out


def load_checkpoint(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full state dict of a checkpoint (every key, tied keys sharing one tensor), on the
    CPU: for use outside a pipeline, e.g. `model.load_state_dict(fxpipe.load_checkpoint(d))`."""
    index = read_index(folder)
    return read_tensors(folder, index, list(index.entries))


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a loaded value into a parameter/buffer in place (keeps its identity for optimizers)."""
    with torch.no_grad():
        dst.copy_(src.to(dst.device))


def save_model(model: nn.Module, folder: str | os.PathLike, fingerprint: str, devices: int) -> None:
    """One-process save (the local CompiledModel, whose `devices` share one process): one
    shard with every tensor, and the index."""
    table = tensor_table(model)
    if any(t.is_meta for t in table.tensors.values()):
        raise FxpipeError("the model still has tensors on the meta device; load real values before saving")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # FileExistsError when `folder` is a file (a checkpoint is a folder), or unwritable
        raise FxpipeError(f"cannot create checkpoint folder {os.fspath(folder)!r}: {e.strerror or e}; a checkpoint "
                          "is a folder: give a new or existing folder's path") from None
    (Path(folder) / INDEX_NAME).unlink(missing_ok=True)
    owner = {k: 0 for k in table.tensors}
    index = make_index(table, owner, 1, fingerprint, type(model).__name__, devices)
    write_shard(folder, 0, 1, {k: t for k, t in table.tensors.items() if table.canonical[k] == k})
    remove_stale_shards(folder, index.files)
    write_index(folder, index)


def load_into_model(model: nn.Module, folder: str | os.PathLike, fingerprint: str | None) -> None:
    """One-process load: check the checkpoint fits `model`, then copy every tensor in place."""
    table = tensor_table(model)
    index = read_index(folder)
    check_compatible(index, table, fingerprint, folder, type(model).__name__)
    canon = [k for k in table.tensors if table.canonical[k] == k]
    for k, v in read_tensors(folder, index, canon).items():
        copy_into(table.tensors[k], v)
