"""Boundary transfers that overlap with compute: one copy stream per channel, events, pinned staging.

A `Channel` is one direction between two workers. `send` enqueues the copy of a boundary's
tensors on the channel's own CUDA stream right when the sender produced them (the copy
stream waits for an event on the sender's compute stream, never the host), so the copy runs
while both sides compute other microbatches; `receive` makes the receiver wait for the copy
(its compute stream waits on the copy's event; a CPU receiver synchronises on the event).

Routes:

* CUDA -> CUDA (other device): ``tensor.to(dst, non_blocking=True)`` on the copy stream.
* CUDA -> CPU: into a pinned host buffer (torch's caching host allocator is the pool: a
  buffer returns to it when its tensor is freed, after the copies that used it) on the copy
  stream; the receiver synchronises on the event before reading.
* CPU -> CUDA: the tensor is staged in pinned memory, then copied on the copy stream.
* ``via_host=True`` (same GPU, for `benchmarks/overlap.py`): device -> pinned host -> device
  on the copy stream, the route a PCIe link between two GPUs takes.
* CPU -> CPU, or the same device: nothing to copy; the tensors are handed over.

The local runtime uses channels unless `FXPIPE_COPY_STREAMS=0` (see `runtime/local.py`), in
which case a receiver copies on its own compute stream. On an H100, device -> pinned host ->
device transfers overlap compute with efficiency 0.87-0.88 (`benchmarks/overlap.py`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Channel"]


class Channel:
    """Copies from worker device `src` to `dst` on a stream of their own.

    Example (CPU: nothing to move, the tensors are handed over as they are):
        >>> ch = Channel(torch.device("cpu"), torch.device("cpu"))
        >>> t = torch.ones(2)
        >>> moved, ready = ch.send([t])
        >>> ch.receive(moved, ready)[0] is t
        True
    """

    def __init__(self, src: torch.device, dst: torch.device, *, via_host: bool = False):
        self.src, self.dst, self.via_host = torch.device(src), torch.device(dst), via_host
        gpu = self.src if self.src.type == "cuda" else (self.dst if self.dst.type == "cuda" else None)
        self.moves = via_host or (self.src != self.dst and gpu is not None)
        self.stream = torch.cuda.Stream(device=gpu) if self.moves and gpu is not None else None

    def send(self, tensors: list[Any]) -> tuple[list[Any], Any]:
        """Start moving `tensors` (non-tensors pass through) after the work already queued
        on the sender's current stream. Returns (tensors as they will arrive, ready event or None)."""
        if not self.moves or self.stream is None:
            return tensors, None
        cs = self.stream
        if self.src.type == "cuda":
            cs.wait_stream(torch.cuda.current_stream(self.src))  # an event on the sender's stream, no host wait
        out: list[Any] = []
        with torch.cuda.stream(cs):
            for t in tensors:
                out.append(self._move(t, cs) if isinstance(t, torch.Tensor) else t)
            ready = torch.cuda.Event()
            ready.record(cs)
        return out, ready

    def _move(self, t: torch.Tensor, cs: torch.cuda.Stream) -> torch.Tensor:
        if t.device.type == "cuda":
            t.record_stream(cs)  # the sender's allocator must not reuse t before the copy ran
        if self.via_host:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host.to(self.dst, non_blocking=True)
        if self.dst.type == "cpu":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host
        src = t if t.device.type == "cuda" else t.contiguous().pin_memory()
        return src.to(self.dst, non_blocking=True)

    def receive(self, tensors: list[Any], ready: Any) -> list[Any]:
        """Make the receiver wait for the copy: its current CUDA stream waits on `ready`
        (CUDA destination) or the host does (CPU destination)."""
        if ready is None:
            return tensors
        if self.dst.type == "cuda":
            stream = torch.cuda.current_stream(self.dst)
            stream.wait_event(ready)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                    t.record_stream(stream)  # allocated under the copy stream, used on this one
        else:
            ready.synchronize()
        return tensors
