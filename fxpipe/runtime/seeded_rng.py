"""Reproducible random numbers for CPU workers running concurrently.

CPU workers share torch's one CPU generator. With several microbatches in flight, two CPU
workers' forwards draw from it concurrently (stage 0's dropout on microbatch 1 while stage 1's
runs on microbatch 0), so the masks depend on thread timing and `torch.manual_seed` no longer
makes a run reproducible. Instead, each (stage, microbatch) forward draws from its own
generator, seeded from one number the driver draws from the global generator per call:
the same seed gives the same masks, and successive steps get different ones.

`seed_random_ops` rewrites a stage graph so that its random ops take
`generator=current_generator()`: dropout (nn.Dropout, F.dropout, torch.dropout,
aten.dropout) becomes `dropout`, which draws its mask like eager's CPU dropout but from that
generator; torch/aten random ops and in-place Tensor samplers get the generator keyword.
Outside `generator_scope` the current generator is None and everything runs as before.
Other random modules (Dropout2d, AlphaDropout) keep the global generator.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["current_generator", "dropout", "module_dropout", "generator_scope", "microbatch_seed",
           "seed_random_ops"]

_tls = threading.local()

# functions and Tensor methods whose `generator=` keyword picks the generator they draw from
_GENERATOR_FUNCTIONS = (torch.rand, torch.randn, torch.randint, torch.randperm, torch.bernoulli, torch.normal,
                        torch.multinomial, torch.poisson)
_GENERATOR_METHODS = ("bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_", "log_normal_",
                      "cauchy_", "bernoulli", "multinomial")


def current_generator() -> torch.Generator | None:
    """This thread's generator for the forward running now, or None (torch's default)."""
    return getattr(_tls, "generator", None)


@contextlib.contextmanager
def generator_scope(seed: int | None) -> Iterator[None]:
    """Random ops rewritten by `seed_random_ops` draw from a fresh generator seeded `seed`
    in this thread (None: torch's default generator, as without the rewrite)."""
    prev = getattr(_tls, "generator", None)
    _tls.generator = None if seed is None else torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        _tls.generator = prev


def microbatch_seed(base: int, stage: int, mb: int) -> int:
    """The seed of one (stage, microbatch) forward, from the call's base seed."""
    return hash((base, stage, mb)) & ((1 << 63) - 1)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """`F.dropout`, drawing its mask from `current_generator()` when one is set (the same
    arithmetic as eager's CPU dropout: a Bernoulli(1 - p) mask divided by 1 - p)."""
    gen = current_generator()
    if gen is None or not training or p == 0 or p == 1 or input.numel() == 0 or input.device.type != "cpu":
        return F.dropout(input, p, training, inplace)
    if not 0 < p < 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    noise = torch.empty_like(input).bernoulli_(1 - p, generator=gen).div_(1 - p)
    return input.mul_(noise) if inplace else input * noise


def module_dropout(module: torch.nn.Module, input: torch.Tensor) -> torch.Tensor:
    """An nn.Dropout call as `dropout`; reads p and the train/eval mode at call time."""
    return dropout(input, module.p, module.training, module.inplace)


def _aten_dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    return dropout(input, p, train)


def seed_random_ops(gm: fx.GraphModule) -> bool:
    """Rewrite `gm` in place so its random ops draw from `current_generator()` (see the module
    docstring); returns whether anything changed."""
    g = gm.graph
    changed = False
    gen_node = None

    def generator_node(before: fx.Node) -> fx.Node:
        nonlocal gen_node
        if gen_node is None:
            first = next(n for n in g.nodes if n.op != "placeholder")
            with g.inserting_before(first):
                gen_node = g.call_function(current_generator)
        return gen_node

    for node in list(g.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is torch.nn.Dropout:
            with g.inserting_before(node):
                mod = g.get_attr(node.target)
                new = g.call_function(module_dropout, (mod, *node.args), dict(node.kwargs))
        elif node.op == "call_function" and node.target is F.dropout:
            with g.inserting_before(node):
                new = g.call_function(dropout, node.args, dict(node.kwargs))
        elif node.op == "call_function" and node.target in (torch.dropout, torch.ops.aten.dropout.default):
            with g.inserting_before(node):
                new = g.call_function(_aten_dropout, node.args, dict(node.kwargs))
        else:
            takes = (node.op == "call_function" and (node.target in _GENERATOR_FUNCTIONS or _schema_has_generator(node.target))
                     or node.op == "call_method" and node.target in _GENERATOR_METHODS)
            if takes and node.kwargs.get("generator") is None:
                node.kwargs = {**node.kwargs, "generator": generator_node(node)}
                changed = True
            continue
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _schema_has_generator(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    return schema is not None and any(a.name == "generator" and a.kwarg_only for a in schema.arguments)
