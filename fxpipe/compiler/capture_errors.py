"""The messages of a failed capture: which path failed, why, and where in the user's code.

`capture` tries fx, then torch.export; when both fail (or a check refuses their graph),
`explain_failure` turns each path's exception into one line with the user's frame and what
to try. Kept apart from the tracers: wording, not tracing.
"""

from __future__ import annotations

import traceback

from torch import nn

from fxpipe.errors import TraceError

__all__ = ["first_line", "explain_failure"]


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters."""
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


def _user_frame(e: BaseException) -> str:
    """The deepest frame of the traceback that is not torch's own code: where the user's model is."""
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if "site-packages/torch" not in f.filename and "/fxpipe/" not in f.filename]
    if not user:
        return ""
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def explain_failure(model: nn.Module, errors: dict[str, BaseException]) -> str:
    """The TraceError message when every capture path failed: per path why and where, then what to try."""
    lines = [f"could not capture {type(model).__name__} as a graph."]
    for path, e in errors.items():
        where = _user_frame(e)
        # fxpipe's own diagnosis is one line with its fix: keep it whole
        why = f"TraceError: {e}" if type(e) is TraceError and "\n" not in str(e) else first_line(e)
        lines.append(f"  {path}: {why}" + (f"\n      at {where}" if where else ""))
    lines.append(
        "What to try: make control flow independent of tensor values (use torch.where / torch.cond), "
        "mark the offending submodule as a leaf (leaf_modules=(MyBlock,)) so fx does not look inside it, "
        "pass non-tensor arguments as constants, or give an example batch of at least 2.")
    return "\n".join(lines)
