"""Reading weight files without executing code from them.

Release checkpoints often hold more than tensors: an argparse `Namespace`, a config object,
optimizer state, an EMA copy. `torch.load(weights_only=True)` refuses such files outright, and
allowing the real classes would let the file run their code. Here every global the file names
outside torch's allow-list is bound to `OpaqueObject`, an inert stand-in that only records the
arguments and state it is given, so the whole file unpickles and the tensors can be taken from
wherever the authors put them. safetensors files are read with safetensors.

Files that name a module able to run commands or code (`os`, `subprocess`, `sys`, `builtins.eval`, ...; see
`REFUSED_MODULES`) are refused whole with a `RefusedCheckpointError` naming them, before anything is unpickled:
no release file needs them, and a file that carries them was made to attack. Anything that is not a readable
checkpoint (empty, truncated, another format) raises a `ValueError` naming the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping

import torch

__all__ = [
    "REFUSED_MODULES",
    "OpaqueObject",
    "RefusedCheckpointError",
    "find_state_dict",
    "load_checkpoint_file",
    "load_state_dict_file",
]


class OpaqueObject:
    """Inert stand-in for a class or function named in a checkpoint; it never runs any code."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"OpaqueObject({self._qualname})"


# Modules (and their Python 2 names, which pickle protocol 2 writes) whose functions run commands, code or I/O.
REFUSED_MODULES = frozenset(
    {
        "os", "posix", "nt", "subprocess", "commands", "sys", "shutil", "socket", "importlib", "runpy", "pty",
        "code", "codeop", "ctypes", "pickle", "_pickle", "cPickle", "marshal", "webbrowser", "multiprocessing",
        "pdb", "urllib", "http", "ftplib", "smtplib",
    }
)  # fmt: skip
_REFUSED_BUILTINS = frozenset(
    {"eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "delattr", "globals", "locals",
     "vars", "breakpoint", "input", "exit", "quit", "help", "memoryview"}
)  # fmt: skip


class RefusedCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint naming a module or builtin that can run commands or code; nothing of it was loaded."""


def _refused(qualname: str) -> bool:
    module, _, name = qualname.rpartition(".")
    root = module.split(".")[0]
    return root in REFUSED_MODULES or (root in ("builtins", "__builtin__") and name in _REFUSED_BUILTINS)


def _stand_in(qualname: str) -> type:
    # One subclass per name so that repr() says what the file referred to.
    return type("OpaqueObject", (OpaqueObject,), {"_qualname": qualname})


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """Load a `.pth`/`.pt`/`.bin` or `.safetensors` file safely.

    Pickled files are read with `weights_only=True`; non-tensor globals become `OpaqueObject`s.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location))
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    if not zipfile.is_zipfile(path):
        # torch's legacy format (before 1.6) cannot be scanned for globals; weights_only alone reads it, and
        # refuses anything beyond tensors and containers.
        return _torch_load(path, map_location, None)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # a damaged archive: zipfile, pickle or torch report it in their own ways
        raise ValueError(f"{path} is not a readable checkpoint: {_first_line(err)}") from None
    refused = sorted(name for name in unsafe if _refused(name))
    if refused:
        raise RefusedCheckpointError(
            f"refusing to load {path}: it names {refused[:5]}, which can run commands or code "
            "(no weight file needs them)"
        )
    return _torch_load(path, map_location, [(_stand_in(name), name) for name in unsafe])


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def _torch_load(path: str, map_location: str | torch.device, stand_ins: list | None) -> object:
    """torch.load(weights_only=True) with stand_ins allowed; None: a legacy-format file, which takes none."""
    try:
        with torch.serialization.safe_globals(stand_ins or []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
        if reason is None:
            raise ValueError(f"{path} is not a readable checkpoint: {_first_line(err)}") from None
        if stand_ins is None and "blocked" not in reason:
            raise ValueError(
                f"{path} is in torch's legacy format (before 1.6), which loads here only when it holds nothing "
                f"but tensors and containers: {reason}"
            ) from None
        # torch blocks some modules (os, ...) even when allow-listed.
        raise RefusedCheckpointError(f"refusing to load {path}: {reason}") from None
    except (RuntimeError, ValueError, EOFError, OSError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable checkpoint: {_first_line(err)}") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(checkpoint: object, keys: Iterable[str] = ("model", "state_dict", "module")) -> dict:
    """Return the model's tensors from a loaded checkpoint.

    Looks under `keys` in order (nested one level too, e.g. `{"state_dict": {"model": ...}}`), else
    takes the checkpoint itself when it maps names to tensors. EMA copies are not preferred: the
    weights the authors evaluate are the ones under their loader's key, which callers pass first.
    """
    if _is_state_dict(checkpoint):
        return dict(checkpoint)
    if isinstance(checkpoint, Mapping):
        for key in keys:
            value = checkpoint.get(key)
            if _is_state_dict(value):
                return dict(value)
            if isinstance(value, Mapping):
                for inner in keys:
                    if _is_state_dict(value.get(inner)):
                        return dict(value[inner])
        found = sorted(str(k) for k in checkpoint.keys())
        raise KeyError(f"no state dict under {list(keys)} in checkpoint; its top-level keys are {found[:20]}")
    raise TypeError(f"checkpoint holds a {type(checkpoint).__name__}, not a state dict")


def load_state_dict_file(path: str | os.PathLike, keys: Iterable[str] = ("model", "state_dict", "module")) -> dict:
    """`load_checkpoint_file` then `find_state_dict`, with any DataParallel `module.` prefix removed.

    Raises:
        ValueError: naming the path, for a file that is not a checkpoint (empty, truncated, foreign) or holds no
            state dict (a pickled list, a dict without tensors).
    """
    try:
        state_dict = find_state_dict(load_checkpoint_file(path), keys)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{os.fspath(path)} holds no model weights: {err.args[0] if err.args else err}") from None
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict
