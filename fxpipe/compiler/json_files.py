"""Reading fxpipe's JSON files (cluster files, plan files) with every failure a PlanError.

Shared by `Cluster.load` and `Plan.load`, so it belongs to neither.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fxpipe.errors import PlanError

__all__ = ["read_json_file"]


def read_json_file(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """Parse a JSON file; every way it can fail (missing, unreadable, not JSON) is a PlanError
    naming `what` and the path."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise PlanError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"cannot read {what} {path}: {e}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        if text.strip() and text.lstrip()[0] not in "{[":
            # not a damaged JSON file but another kind of file (a model's .py, a checkpoint)
            raise PlanError(f"{what} {path} is not a JSON file (it starts with {text.lstrip()[:20]!r}); give the "
                            f"{what} fxpipe wrote (JSON)") from None
        raise PlanError(f"{what} {path} is not valid JSON: {e}{hint}") from None
