"""What the user hands the command line: the --devices list and the FILE.py:FACTORY model.

`load_factory` imports the user's file and calls the factory (their code: every failure
becomes one CliError line, sys.argv and sys.path restored); `parse_devices` expands
'cpu*4'; `_same_file` guards outputs that would overwrite an input. CliError, the usage
error every command raises (exit status 2), lives here, below the command modules.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["CliError", "parse_devices", "load_factory"]


class CliError(Exception):
    """A usage problem (bad argument, missing file, bad factory); exit status 2."""


def parse_devices(text: str) -> list[str]:
    """'cpu,cpu' -> ['cpu', 'cpu']; 'cpu*4' -> four 'cpu'; 'cuda:0,cuda:1' as given."""
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise CliError(f"--devices {text!r} has an empty entry; write e.g. 'cpu,cpu' or 'cpu*2'")
        name, star, count = item.partition("*")
        name = name.strip()
        n = 1
        if star:
            try:
                n = int(count)
            except ValueError:
                n = 0
            if not 1 <= n <= 65536:
                raise CliError(f"--devices entry {item!r}: the count after '*' must be a positive integer, e.g. 'cpu*4'")
        if not name:
            raise CliError(f"--devices entry {item!r} has no device name; write e.g. 'cpu*4'")
        out += [name] * n
    return out


def load_factory(spec: str) -> tuple[Any, tuple, dict]:
    """Import FILE from 'FILE:FACTORY', call FACTORY() and check it returns a model and inputs."""
    from torch import Tensor, nn

    path_text, colon, name = spec.rpartition(":")
    if not colon or not path_text or not name:
        raise CliError(f"model {spec!r} is not of the form FILE.py:FACTORY (e.g. mymodel.py:make)")
    path = Path(path_text)
    if not path.is_file():
        if path.is_dir():
            raise CliError(f"model file {path} is a folder; name the Python file in it, e.g. {path / 'mymodel.py'}:{name}")
        hint = f"; did you mean {path}.py:{name}?" if path.suffix != ".py" and path.with_name(path.name + ".py").is_file() else ""
        raise CliError(f"model file {path} does not exist{hint}")
    mod_name = f"_fxpipe_user_{path.stem}"
    mspec = importlib.util.spec_from_file_location(mod_name, path)
    if mspec is None or mspec.loader is None:
        raise CliError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[mod_name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so the file (and its factory) can import its neighbours
    # The file runs as if started without arguments: a top-level argparse `parse_args()` would
    # otherwise read fxpipe's own arguments and exit with "unrecognized arguments: plan ...".
    argv, sys.argv = sys.argv, [str(path)]
    exits = ("exited (SystemExit: {}) while {}: it calls sys.exit or parses the command line; move that under "
             "`if __name__ == '__main__':`")
    try:
        try:
            mspec.loader.exec_module(module)
        except Exception as e:  # the user's code: report it in one line
            sys.modules.pop(mod_name, None)
            raise CliError(f"importing {path} failed: {type(e).__name__}: {e}") from None
        except SystemExit as e:  # not an Exception: would end fxpipe with the user's exit code, unexplained
            sys.modules.pop(mod_name, None)
            raise CliError(f"{path} " + exits.format(e.code, "being imported")) from None
        factory = getattr(module, name, None)
        if factory is None:
            found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == mod_name)
            raise CliError(f"{path} has no function {name!r}" + (f"; it defines {', '.join(found)}" if found else ""))
        if not callable(factory):
            raise CliError(f"{path}:{name} is not a function but a value of type {type(factory).__name__}")
        try:
            result = factory()
        except Exception as e:
            raise CliError(f"{path}:{name}() raised {type(e).__name__}: {e}") from None
        except SystemExit as e:
            raise CliError(f"{path}:{name}() " + exits.format(e.code, "building the model")) from None
    finally:
        sys.argv = argv
        if folder in sys.path:
            sys.path.remove(folder)
    want = "(model, example_args) or (model, example_args, example_kwargs)"
    if isinstance(result, nn.Module):  # `mymodel.py:MyModel` names the class, or the factory forgot the inputs
        raise CliError(f"{path}:{name}() returned only a model ({type(result).__name__}); planning needs an example "
                       f"batch too: name a function that returns {want}, e.g. `return model, torch.randn(32, 64)`")
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise CliError(f"{path}:{name}() returned {type(result).__name__}; it must return {want}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(model, nn.Module):
        raise CliError(f"{path}:{name}() returned a {type(model).__name__} as the model; it must be a torch.nn.Module")
    if isinstance(args, Tensor):
        args = (args,)
    elif isinstance(args, dict) and len(result) == 2:  # keyword arguments, as fxpipe.compile's example_inputs takes
        args, kwargs = (), args
    if not isinstance(args, tuple):
        raise CliError(f"{path}:{name}() returned example_args of type {type(args).__name__}; "
                       "give a tensor, a tuple of arguments or a dict of keyword arguments")
    if not isinstance(kwargs, dict):
        raise CliError(f"{path}:{name}() returned example_kwargs of type {type(kwargs).__name__}; give a dict")
    return model, args, kwargs


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths `a` and `b` name one existing file (through links and relative parts)."""
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False
