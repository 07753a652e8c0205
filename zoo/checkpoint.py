"""Reading weight files without executing code from them.

Release checkpoints often hold more than tensors: an argparse `Namespace`, a config object,
optimizer state, an EMA copy. `torch.load(weights_only=True)` refuses such files outright, and
allowing the real classes would let the file run their code. Here every global the file names
outside torch's allow-list is bound to `OpaqueObject`, an inert stand-in that only records the
arguments and state it is given, so the whole file unpickles and the tensors can be taken from
wherever the authors put them. safetensors files are read with safetensors.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping

import torch

__all__ = ["OpaqueObject", "load_checkpoint_file", "find_state_dict", "load_state_dict_file"]


class OpaqueObject:
    """Inert stand-in for a class or function named in a checkpoint; it never runs any code."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"OpaqueObject({self._qualname})"


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
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(_stand_in(name), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch blocks some modules (os, subprocess, ...) even when allow-listed: such a file is refused whole.
        reason = next((line for line in str(err).splitlines() if "GLOBAL" in line), str(err).splitlines()[0])
        raise pickle.UnpicklingError(f"refusing to load {path}: {reason.strip()}") from None


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
    """`load_checkpoint_file` then `find_state_dict`, with any DataParallel `module.` prefix removed."""
    state_dict = find_state_dict(load_checkpoint_file(path), keys)
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict
