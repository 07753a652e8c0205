"""What the distribution installs: one top-level name, `zoo`, with kernels/ and blocks/ as `zoo.kernels` and
`zoo.blocks`, so that another distribution's top-level `kernels` (Hugging Face's, which diffusers and transformers
use for hub kernels) or `blocks` installed beside the zoo breaks neither."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

from tests._subprocess import describe

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder(package: str) -> Path:
    """The repository folder of an installed package name, through pyproject's package-dir mapping."""
    mapping = _setuptools()["package-dir"]
    for prefix in sorted(mapping, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            return ROOT / mapping[prefix] / Path(*package[len(prefix) :].lstrip(".").split(".") or [])
    return ROOT / Path(*package.split("."))


def test_the_package_list_covers_every_source_folder():
    listed = set(_setuptools()["packages"])
    folders = {p.parent for top in ("zoo", "kernels", "blocks") for p in (ROOT / top).rglob("__init__.py")}
    assert {_folder(name) for name in listed} == folders, "pyproject.toml's packages and the folders differ"
    assert {name.split(".")[0] for name in listed} == {"zoo"}, "only `zoo` may be a top-level name"


def test_the_wheel_holds_only_zoo(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, describe(proc)
    (wheel,) = tmp_path.glob("zoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"zoo"}, tops
    assert "zoo/kernels/block_sparse_attention/triton_impl.py" in names
    assert "zoo/blocks/routing.py" in names


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_other_kernels_and_blocks_distributions_break_neither(tmp_path):
    # Stand-ins for other distributions' top-level packages, first on the path, with the zoo installed beside
    # them; the child runs outside the repository so that the folders here are not importable by accident.
    # Where Hugging Face's `kernels` itself is installed (transformers >= 5.25 pulls it in), diffusers imports it,
    # so the real one is used instead of a stand-in.
    stand_ins = ("blocks",) if _installed("kernels") else ("kernels", "blocks")
    for name in stand_ins:
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text(f"WHO = 'the other {name}'\n")
    code = f"""
        import kernels, blocks
        import timm, torch
        import zoo
        from zoo.kernels.block_sparse_attention import block_sparse_attention
        import zoo.blocks.routing

        assert blocks.WHO == "the other blocks"
        assert {"kernels" in stand_ins} <= (getattr(kernels, "WHO", None) == "the other kernels")
        assert "site-packages" in kernels.__file__ or kernels.__file__.startswith({str(tmp_path)!r})
        assert not hasattr(kernels, "block_sparse_attention") and zoo.kernels.__name__ == "zoo.kernels"
        model = timm.create_model("zoo_biformer_t", depths=(1, 1, 1, 1), num_classes=3).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
        import kernels as again
        assert again is kernels, "the zoo replaced the other distribution's module"
        print("ok")
    """
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), describe(proc)
