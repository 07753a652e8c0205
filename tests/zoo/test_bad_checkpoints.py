"""Bad weight files (issue 20): refused when they name code, a ValueError naming the file when they are not a
readable checkpoint, never code run from them. The fuzz damages real files at random and runs in a child
process, so that a crash inside a reader fails the test instead of ending pytest."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess

import pytest
import timm
import torch
from safetensors.torch import save_file

import zoo  # noqa: F401
from tests._subprocess import describe, run_python
from zoo.checkpoint import RefusedCheckpointError, load_checkpoint_file

_TINY = dict(depths=(1, 1, 1, 1), embed_dim=8)


class _Call:
    """Pickles to a call of `func(*args)`: loading must refuse it, not run it."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "payload, named",
    [
        (_Call(subprocess.Popen, ["touch", "PWNED"]), "Popen"),
        (_Call(os.system, "touch PWNED"), "system"),
        (_Call(eval, "__import__('os').system('touch PWNED')"), "builtins.eval"),
        ({"a class": subprocess.Popen}, "Popen"),  # named, not even called
    ],
)
def test_files_naming_code_are_refused_whole(tmp_path, monkeypatch, payload, named):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": payload}, path)
    with pytest.raises(RefusedCheckpointError, match=rf"refusing to load .*evil\.pth: .*{named}") as info:
        load_checkpoint_file(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, pickle.UnpicklingError)
    with pytest.raises(ValueError, match=r"refusing to load"):
        timm.create_model("zoo_focalnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **_TINY)
    assert not (tmp_path / "PWNED").exists()


def test_release_files_with_plain_objects_still_load(tmp_path):
    path = tmp_path / "release.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1, model="x")}, path)
    loaded = load_checkpoint_file(path)
    assert repr(loaded["args"]) == "OpaqueObject(argparse.Namespace)"
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint_file(tmp_path / "old.pth")["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("name, content", [("empty.pth", b""), ("page.pth", b"<html>"), ("x.safetensors", b"{}")])
def test_unreadable_files_are_named(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name} is not a readable"):
        load_checkpoint_file(tmp_path / name)


def test_fuzz_damaged_weight_files(tmp_path):
    """hypothesis truncates, overwrites or appends to real .pth (ours and an official-style release) and
    .safetensors files, then loads them through the loader and through timm.create_model: a ValueError or
    KeyError naming the file or key, or a load whose tensors have the model's shapes."""
    model = timm.create_model("zoo_focalnet_t", **_TINY)
    state = model.state_dict()
    torch.save({"model": state, "args": argparse.Namespace(lr=1)}, tmp_path / "release.pth")
    torch.save(state, tmp_path / "plain.pth", _use_new_zipfile_serialization=False)
    save_file(state, tmp_path / "ours.safetensors")
    proc = run_python(
        f"""
        import os, shutil, tempfile, timm, torch, zoo
        from hypothesis import HealthCheck, given, settings, strategies as st
        from zoo.checkpoint import load_checkpoint_file
        torch.set_num_threads(1)
        SOURCES = {[str(tmp_path / n) for n in ("release.pth", "plain.pth", "ours.safetensors")]!r}
        work = tempfile.mkdtemp()

        @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(source=st.sampled_from(SOURCES), damage=st.sampled_from(["truncate", "overwrite", "append"]),
               at=st.floats(0, 1), junk=st.binary(min_size=1, max_size=64))
        def check(source, damage, at, junk):
            data = open(source, "rb").read()
            cut = int(at * len(data))
            data = {{"truncate": data[:cut], "overwrite": data[:cut] + junk + data[cut + len(junk):],
                     "append": data + junk}}[damage]
            path = os.path.join(work, "damaged" + os.path.splitext(source)[1])
            with open(path, "wb") as f:
                f.write(data)
            try:
                load_checkpoint_file(path)
                model = timm.create_model("zoo_focalnet_t", pretrained=True, depths=(1, 1, 1, 1), embed_dim=8,
                                          pretrained_cfg_overlay=dict(file=path))
            except (ValueError, KeyError) as e:
                assert "damaged" in str(e) or "key" in str(e).lower(), str(e)
                return
            assert sum(p.numel() for p in model.parameters()) > 0

        check()
        print("fuzzed")
        """,
        timeout=600,
    )
    assert proc.returncode == 0, describe(proc)
    assert "fuzzed" in proc.stdout
