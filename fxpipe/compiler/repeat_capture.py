"""Capture by repetition: trace two blocks of a deep model, copy the second for the others.

Tracing an 80-layer decoder with `torch.export` costs seconds per layer, yet its blocks are
the same code on same-shaped weights. This module finds the model's list of identical
blocks (a `ModuleList` / `Sequential` of >= 4 blocks of one class with the same parameter
and buffer shapes and the same configuration attributes), captures a shallow copy of the
model whose list holds only its first two blocks (the user's model is not touched), and
inserts copies of block 1's nodes for blocks 2..N-1: `get_attr` / `call_module` targets and
`nn_module_stack` renamed to the block's own name, the block-to-block inputs (the residual
stream) rewired to the previous copy and the nodes after the list (final norm, head) to the
last copy. Inputs every block reads (attention mask, rotary tables) stay shared.

The result is the graph a full capture produces, node for node (names aside), so the
plan's graph fingerprint is the same and a plan made on a meta-device model is accepted by
`compile(real_model, plan=...)`. Anything unexpected (block 0 and block 1 traced
differently, the blocks' nodes interleaved with other nodes, a value of block 0 read after
the list, a block parameter shared elsewhere) raises `RepeatUnsupported`; the caller falls
back to a full capture or reports it.

Each copied node records its template in `node.meta["fxpipe.template"]` (the name of the
block-1 node it was copied from), which shape propagation and the cost pass use to reuse the template's
results instead of recomputing them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

__all__ = ["BlockList", "RepeatUnsupported", "find_block_list", "truncated_model", "replicate_blocks", "TEMPLATE",
           "MIN_BLOCKS", "KEEP"]

TEMPLATE = "fxpipe.template"  # on a copied node: the name of the block-1 node it was copied from
MIN_BLOCKS = 4  # fewer blocks gain too little over a full capture to be worth the risk
KEEP = 2  # blocks traced: block 0 (fed by the embedding) and block 1, the template

# Attributes that only say which block a module is (HF attention's `layer_idx` indexes the KV
# cache, which capture switches off); any other attribute that differs between blocks is
# configuration (sliding window, layer type) and stops the repetition.
_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num", "block_idx",
                          "block_id", "block_index", "idx"})
_SKIP_ATTRS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
_PRIMITIVE = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


class RepeatUnsupported(Exception):
    """The repeat path does not apply to this model or graph; the message says why."""


@dataclass(frozen=True)
class BlockList:
    """The model's list of identical blocks: where it is and the blocks' keys in it."""

    path: str  # qualified name of the ModuleList / Sequential ("" when it is the model itself)
    keys: tuple[str, ...]  # child names, in order ("0", "1", ...)

    def block(self, i: int) -> str:
        """Qualified name of block i."""
        return f"{self.path}.{self.keys[i]}" if self.path else self.keys[i]


# ---- finding the blocks ------------------------------------------------------------------

def find_block_list(model: nn.Module) -> BlockList:
    """The largest (by parameter count) list of >= MIN_BLOCKS structurally identical blocks.

    Raises RepeatUnsupported when there is none; the message gives the largest list's reason
    (blocks that differ in anything but their index attributes, shared parameters).
    """
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    cfg = getattr(model, "config", None)
    kinds = getattr(cfg, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(set(map(str, kinds))) > 1:
        raise RepeatUnsupported(f"config.layer_types mixes {sorted(set(map(str, kinds)))}")
    candidates = [(sum(p.numel() for p in mod.parameters()), path, mod) for path, mod in model.named_modules()
                  if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= MIN_BLOCKS]
    if not candidates:
        raise RepeatUnsupported(f"no ModuleList or Sequential of >= {MIN_BLOCKS} blocks")
    reasons = []
    for _, path, lst in sorted(candidates, key=lambda c: -c[0]):
        why = _why_not_identical(path, lst, names_of)
        if not why:
            return BlockList(path, tuple(lst._modules))
        reasons.append(why)
    raise RepeatUnsupported(reasons[0])


def _why_not_identical(path: str, lst: nn.Module, names_of: dict[int, list[str]]) -> str:
    keys = tuple(lst._modules)
    blocks = [lst._modules[k] for k in keys]
    where = path or "the model"
    if len({id(b) for b in blocks}) != len(blocks):
        return f"{where} holds the same block object more than once"
    ref = _signature(blocks[0])
    for k, b in zip(keys[1:], blocks[1:]):
        why = _differs(ref, _signature(b))
        if why:
            return f"block {k} of {where} differs from block {keys[0]}: {why}"
    prefix = f"{path}." if path else ""
    for p_name, _ in blocks[0].named_parameters(remove_duplicate=False):
        for k, b in zip(keys, blocks):
            q = b.get_parameter(p_name)
            others = [n for n in names_of.get(id(q), ()) if n != f"{prefix}{k}.{p_name}"]
            if others:  # a full capture names a shared parameter by its first name only
                return f"parameter {prefix}{k}.{p_name} is shared with {others}"
    return ""


def _signature(block: nn.Module) -> dict[str, Any]:
    """What makes two blocks trace to the same graph: per submodule, its class, parameter
    and buffer shapes, and its configuration attributes (index attributes left out)."""
    out: dict[str, Any] = {}
    for name, mod in block.named_modules(remove_duplicate=False):
        attrs = {}
        for k, v in vars(mod).items():
            if k in _SKIP_ATTRS or k in _INDEX_ATTRS:
                continue
            if k.endswith("_hooks") or k.endswith("_hooks_with_kwargs") or k.endswith("_hooks_always_called"):
                attrs[k] = len(v) if hasattr(v, "__len__") else v  # hooks: same count (the same functions in HF)
                continue
            attrs[k] = _attr_key(v)
        out[name] = (
            type(mod),
            tuple((k, tuple(p.shape), p.dtype, p.requires_grad) for k, p in mod._parameters.items() if p is not None),
            tuple((k, tuple(b.shape), b.dtype, k in mod._non_persistent_buffers_set)
                  for k, b in mod._buffers.items() if b is not None),
            attrs,
        )
    return out


def _attr_key(v: Any) -> Any:
    # Plain values compare by value; containers of them element-wise; any other object (a
    # shared config, an activation function) by identity, which is what blocks built by one
    # loop share, while a per-block object of its own makes the blocks differ (conservative).
    if isinstance(v, _PRIMITIVE):
        return v
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(_attr_key(x) for x in v))
    if isinstance(v, dict):
        return (dict, tuple((k, _attr_key(x)) for k, x in v.items()))
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype)
    return ("object", id(v))


def _differs(a: dict[str, Any], b: dict[str, Any]) -> str:
    if list(a) != list(b):
        return f"submodules {list(a)[:6]} vs {list(b)[:6]}"
    for name in a:
        ta, pa, ba, xa = a[name]
        tb, pb, bb, xb = b[name]
        where = name or "the block"
        if ta is not tb:
            return f"{where} is {ta.__name__} vs {tb.__name__}"
        if pa != pb:
            return f"parameters of {where} differ"
        if ba != bb:
            return f"buffers of {where} differ"
        if xa.keys() != xb.keys():
            return f"attributes of {where} differ: {sorted(set(xa) ^ set(xb))}"
        for k in xa:
            if not _equal(xa[k], xb[k]):
                return f"attribute {where}.{k} differs"
    return ""


def _equal(x: Any, y: Any) -> bool:
    try:
        return bool(type(x) is type(y) and x == y)
    except Exception:
        return x is y


# ---- the truncated model -----------------------------------------------------------------

def _shallow(mod: nn.Module) -> nn.Module:
    # A new object sharing every attribute (parameters, config, hooks) but with its own
    # `_modules` dict, so replacing a child never reaches the user's module.
    new = type(mod).__new__(type(mod))
    new.__dict__.update(mod.__dict__)
    new.__dict__["_modules"] = dict(mod._modules)
    return new


def truncated_model(model: nn.Module, blocks: BlockList, keep: int = KEEP) -> nn.Module:
    """A shallow copy of `model` whose block list holds only its first `keep` blocks.

    Parameters, buffers and every other module are the user's own objects (so the captured
    graph names them as the full model does); only the modules on the path to the list are
    copied, and the user's model is left as it was.
    """
    parts = blocks.path.split(".") if blocks.path else []
    chain = [model]
    for part in parts:
        chain.append(chain[-1]._modules[part])
    lst = _shallow(chain[-1])
    lst.__dict__["_modules"] = {k: chain[-1]._modules[k] for k in blocks.keys[:keep]}
    child = lst
    for parent, part in zip(reversed(chain[:-1]), reversed(parts)):
        new_parent = _shallow(parent)
        new_parent._modules[part] = child
        child = new_parent
    return child


# ---- replicating block 1 in the graph ----------------------------------------------------

def _member(blocks: BlockList, i: int) -> Callable[[fx.Node], bool]:
    name = blocks.block(i)
    dotted = name + "."

    def inside(s: str) -> bool:
        return s == name or s.startswith(dotted)

    def test(n: fx.Node) -> bool:
        if n.op in ("placeholder", "output"):
            return False
        if n.op in ("get_attr", "call_module"):
            return inside(str(n.target))
        for v in (n.meta.get("nn_module_stack") or {}).values():
            fqn = v[0] if isinstance(v, tuple) else str(v)
            if inside(fqn):
                return True
        return False

    return test


def _runs(nodes: list[fx.Node], order: dict[fx.Node, int]) -> list[list[fx.Node]]:
    runs: list[list[fx.Node]] = []
    for n in nodes:
        if runs and order[n] == order[runs[-1][-1]] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


def _renamer(old: str, new: str) -> Callable[[str], str]:
    def rename(s: str) -> str:
        if s == old or s.startswith(old + "."):
            return new + s[len(old):]
        return s

    return rename


def _renamed_stack(stack: dict, old: str, new: str) -> dict:
    rename = _renamer(old, new)
    out = {}
    for k, v in stack.items():
        fqn = v[0] if isinstance(v, tuple) else str(v)
        nf = rename(fqn)
        nk = k
        if nf != fqn and isinstance(k, str) and k.endswith(fqn):  # export's keys end with the fqn
            nk = k[: len(k) - len(fqn)] + nf
        out[nk] = (nf, *v[1:]) if isinstance(v, tuple) else nf
    return out


_NUMBERED = re.compile(r"^(.*?)(?:_\d+)?$")


class _Matcher:
    """Aligns block 0's nodes with block 1's and learns which inputs are carried."""

    def __init__(self, b0: list[fx.Node], b1: list[fx.Node], rename01: Callable[[str], str]):
        self.pos0 = {n: i for i, n in enumerate(b0)}
        self.pos1 = {n: i for i, n in enumerate(b1)}
        self.rename01 = rename01

    def node(self, a: fx.Node, b: fx.Node) -> None:
        if a.op != b.op:
            raise RepeatUnsupported(f"{a.format_node()} and {b.format_node()} differ in kind")
        if a.op in ("get_attr", "call_module"):
            if self.rename01(str(a.target)) != str(b.target):
                raise RepeatUnsupported(f"targets {a.target} and {b.target} do not correspond")
        elif a.target != b.target:
            raise RepeatUnsupported(f"{a.format_node()} and {b.format_node()} call different targets")
        self.arg(a.args, b.args, b)
        self.arg(a.kwargs, b.kwargs, b)

    def arg(self, x: Any, y: Any, where: fx.Node) -> None:
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
                raise RepeatUnsupported(f"argument of {where.format_node()} is a node in one block only")
            if x in self.pos0:  # internal to the block: the same position in block 1
                if self.pos1.get(y) != self.pos0[x]:
                    raise RepeatUnsupported(f"{where.format_node()} reads a different node of its block")
            elif y in self.pos0:  # carried: block 1 reads block 0 where block 0 read the list's input
                if x in self.pos1:
                    raise RepeatUnsupported(f"block 0 reads block 1 at {where.format_node()}")
            elif x is not y:  # shared inputs (mask, rotary tables) are the same node
                raise RepeatUnsupported(f"{where.format_node()} reads {y.name} where block 0 read {x.name}")
            return
        if type(x) is not type(y):
            raise RepeatUnsupported(f"argument types differ at {where.format_node()}")
        if isinstance(x, (tuple, list)):
            if len(x) != len(y):
                raise RepeatUnsupported(f"argument lengths differ at {where.format_node()}")
            for xi, yi in zip(x, y):
                self.arg(xi, yi, where)
        elif isinstance(x, dict):
            if list(x) != list(y):
                raise RepeatUnsupported(f"keyword arguments differ at {where.format_node()}")
            for k in x:
                self.arg(x[k], y[k], where)
        elif isinstance(x, slice):
            self.arg((x.start, x.stop, x.step), (y.start, y.stop, y.step), where)
        elif not _equal(x, y):
            # a constant that depends on the block's index (GPT-2's scale by 1/(layer_idx+1))
            raise RepeatUnsupported(f"constant {x!r} in block 0 is {y!r} in block 1 at {where.format_node()}")


def replicate_blocks(gm: fx.GraphModule, model: nn.Module, blocks: BlockList, keep: int = KEEP) -> fx.GraphModule:
    """From `gm`, captured with only the first `keep` blocks, build the graph of all of them.

    Args:
        gm: the graph of `truncated_model(model, blocks, keep)` (not modified).
        model: the full model; the copies' parameters and submodules are its own objects.
        blocks: the list found by `find_block_list`.

    Returns a new GraphModule whose copied nodes carry `meta["fxpipe.template"]`.
    Raises RepeatUnsupported when block 1 cannot stand for the others (see module docstring).
    """
    if keep != 2:
        raise ValueError("replicate_blocks learns the carried inputs from blocks 0 and 1: keep must be 2")
    g = fx.Graph()
    g._codegen = gm.graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, env)
    g.output(out)
    for old, new in env.items():  # graph_copy keeps meta by reference; later edits stay on our copy
        new.meta = dict(old.meta)
    nodes = list(g.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    b0 = [n for n in nodes if _member(blocks, 0)(n)]
    b1 = [n for n in nodes if _member(blocks, 1)(n)]
    if not b0 or len(b0) != len(b1):
        raise RepeatUnsupported(f"blocks 0 and 1 traced to {len(b0)} and {len(b1)} nodes")
    both = set(b0) | set(b1)
    runs0, runs1 = _runs(b0, order), _runs(b1, order)
    if [len(r) for r in runs0] != [len(r) for r in runs1]:
        raise RepeatUnsupported("blocks 0 and 1 are laid out differently in the graph")
    for r0, r1 in zip(runs0, runs1):
        # each run of block 1 must follow block 0's directly: nothing of the model's own runs
        # between two blocks (an accumulator like an auxiliary loss would)
        if r0[-1].next is not r1[0]:
            raise RepeatUnsupported(f"node {r0[-1].next.format_node()} sits between blocks 0 and 1")
    matcher = _Matcher(b0, b1, _renamer(blocks.block(0), blocks.block(1)))
    for a, b in zip(b0, b1):
        matcher.node(a, b)
    for n in b0:
        for u in n.users:
            if u not in both:
                raise RepeatUnsupported(f"{u.format_node()} after the blocks reads block 0's {n.name}")
    pos0, pos1 = matcher.pos0, matcher.pos1
    after = [(u, n) for n in b1 for u in n.users if u not in both]  # final norm, head, outputs

    n_blocks = len(blocks.keys)
    prev = b1  # the copy before the one being built
    anchors = [r[-1] for r in runs1]
    for k in range(2, n_blocks):
        name_k = blocks.block(k)
        rename = _renamer(blocks.block(1), name_k)
        copy: list[fx.Node] = []

        def remap(a: fx.Node) -> fx.Node:
            if a in pos1:
                return copy[pos1[a]]
            if a in pos0:  # the residual stream: the previous block's value
                return prev[pos0[a]]
            return a

        for r, run in enumerate(runs1):
            with g.inserting_before(anchors[r].next):
                for t in run:
                    target = rename(t.target) if t.op in ("get_attr", "call_module") else t.target
                    if t.op in ("get_attr", "call_module"):
                        name = target.replace(".", "_")
                    else:  # a fresh number in the graph's namespace: linear_812, not linear_7_1
                        name = _NUMBERED.match(t.name).group(1)
                    new = g.create_node(t.op, target, fx.node.map_arg(t.args, remap),
                                        fx.node.map_arg(t.kwargs, remap), name, t.type)
                    new.meta = dict(t.meta)
                    if "nn_module_stack" in t.meta:
                        new.meta["nn_module_stack"] = _renamed_stack(t.meta["nn_module_stack"], blocks.block(1), name_k)
                    new.meta[TEMPLATE] = t.name
                    copy.append(new)
            anchors[r] = copy[len(copy) - 1]
        prev = copy
    for u, n in after:
        u.replace_input_with(n, prev[pos1[n]])
    try:
        g.lint()
    except Exception as e:
        raise RepeatUnsupported(f"the replicated graph is not well formed: {e}") from None
    attrs: dict[str, Any] = {}
    for n in g.nodes:
        if n.op in ("get_attr", "call_module") and n.target not in attrs:
            try:
                attrs[n.target] = _fetch(gm, n.target)
            except AttributeError:
                attrs[n.target] = _fetch(model, n.target)  # blocks 2..N-1: the user's own objects
    return fx.GraphModule(attrs, g, gm.__class__.__name__)


def _fetch(root: Any, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
