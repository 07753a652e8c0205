"""The arrows of DESIGN.md point down: kernels know nothing of blocks or zoo, blocks nothing of zoo; nothing imports
the benchmark scripts, nothing installed imports the tests, and no file edits `sys.path`."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"kernels": {"blocks", "zoo", "train"}, "blocks": {"zoo", "train"}, "zoo": {"train"}}


def _imported_roots(path: Path) -> set[str]:
    return _imported_roots_of(ast.parse(path.read_text()))


def _layer(module: str) -> str:
    """The layer a module name belongs to: `zoo.kernels.x` is the kernels layer, `zoo.blocks.x` the blocks layer,
    any other name its top-level package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "zoo" and len(parts) > 1 and parts[1] in ("kernels", "blocks") else parts[0]


def _imported_roots_of(tree: ast.AST) -> set[str]:
    """Layers a module imports (see `_layer`): import statements, and string names given to
    `importlib.import_module`, `__import__` or `runpy.run_module`."""
    return {_layer(name) for name in _imported_names_of(tree)}


def _imported_names_of(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and _called_name(node) in ("import_module", "__import__", "run_module"):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
            elif isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
                names.add(str(first.values[0].value).rstrip("."))
    return names


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _python_files(*folders: str) -> list[Path]:
    return [
        path
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}, f"upward imports in {package}/"


def test_kernels_and_blocks_are_imported_by_their_installed_names():
    # kernels/ and blocks/ install as zoo.kernels and zoo.blocks (pyproject.toml): a top-level `kernels` is another
    # distribution's (Hugging Face's), and importing the folder by that name would load a second copy of it.
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            n for n in _imported_names_of(ast.parse(path.read_text())) if n.split(".")[0] in ("kernels", "blocks")
        )
        for path in _python_files("kernels", "blocks", "zoo", "train", "tests", "benchmarks")
    }
    assert not {k: v for k, v in offenders.items() if v}, "import zoo.kernels / zoo.blocks instead"


def test_layers_of_installed_names():
    tree = ast.parse(
        "import zoo.kernels.fused_pointwise as fp\nfrom zoo.blocks import routing\nfrom zoo import video\n"
    )
    assert _imported_roots_of(tree) == {"kernels", "blocks", "zoo"}
    assert _imported_names_of(ast.parse("import kernels")) == {"kernels"}


# DESIGN.md: `blocks/` holds token mixers, one per file, with what a mixer needs of its own (its position bias,
# its config and planner, its token ordering) and the layout helpers mixers share; a family's other layers (its
# blocks, convolutions, MLPs, downsampling) live in its model file `zoo/models/<family>.py`. The classes each
# module of blocks/ may define; a module missing here, or a class not listed for it, fails.
BLOCKS_CLASSES = {
    "__init__.py": set(),
    "_layout.py": set(),  # window/grid partition and padding, shared by the windowed mixers
    "cross_shaped.py": {"CrossShapedWindowAttention"},  # CSWin
    "dual.py": {"WindowAttention", "ChannelAttention"},  # DaViT's two mixers
    "focal_modulation.py": {"FocalModulation"},  # FocalNet
    "hilo.py": {"HiLoAttention"},  # LITv2
    "multi_axis.py": {"PartitionAttention", "RelativePositionBias2d"},  # MaxViT's block/grid attention, its bias
    "pyramid_sparse.py": {"PSAConfig", "PyramidSparseAttention", "VideoSelfAttention"},  # PSA, its config
    "routing.py": {"BiLevelRoutingAttention", "GlobalAttentionLePE"},  # BiFormer's routed and last-stage mixers
    "sparse_patterns.py": {"BlockPattern"},  # STA, neighborhood, radial and VMoBA patterns
    "video_order.py": set(),  # Gilbert curve and tile order of video tokens, for PSA and the patterns
}


def _classes(tree: ast.AST) -> set[str]:
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def _misplaced_classes(name: str, tree: ast.AST) -> set[str]:
    """Classes a blocks/ module defines (at any depth) that the table does not list for it."""
    return _classes(tree) - BLOCKS_CLASSES.get(name, set())


def test_blocks_define_only_their_mixers():
    trees = {p.name: ast.parse(p.read_text()) for p in sorted((ROOT / "blocks").glob("*.py"))}
    assert set(trees) == set(BLOCKS_CLASSES), "a blocks/ module is not in BLOCKS_CLASSES (or is gone)"
    offenders = {name: sorted(_misplaced_classes(name, tree)) for name, tree in trees.items()}
    assert not {k: v for k, v in offenders.items() if v}, "family layers belong in zoo/models/<family>.py"
    missing = {name: sorted(BLOCKS_CLASSES[name] - _classes(tree)) for name, tree in trees.items()}
    assert not {k: v for k, v in missing.items() if v}, "BLOCKS_CLASSES lists classes that are gone"
    packages = [p.name for p in (ROOT / "blocks").iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert not packages, "blocks/ is flat: one module per mixer"


def test_the_blocks_check_catches_a_family_block():
    tree = ast.parse(
        "import torch.nn as nn\nclass MaxViTBlock(nn.Module):\n    pass\nclass PartitionAttention:\n    pass\n"
    )
    assert _misplaced_classes("multi_axis.py", tree) == {"MaxViTBlock"}
    assert _misplaced_classes("new_mixer.py", tree) == {"MaxViTBlock", "PartitionAttention"}


# DESIGN.md: tests and shipped artefacts never import from `benchmarks/` (scripts, not a library); the anchors the
# tests hold (tests/anchors) are no part of what is installed either.
NOT_IMPORTED = {
    "tests": {"benchmarks"},
    "zoo": {"benchmarks", "tests"},
    "blocks": {"benchmarks", "tests"},
    "kernels": {"benchmarks", "tests"},
    "train": {"benchmarks", "tests"},
}


@pytest.mark.parametrize("folder", sorted(NOT_IMPORTED))
def test_benchmarks_and_tests_are_not_imported_from(folder):
    files = _python_files(folder)
    assert files, f"no Python files under {folder}/"
    offenders = {str(path.relative_to(ROOT)): sorted(_imported_roots(path) & NOT_IMPORTED[folder]) for path in files}
    assert not {k: v for k, v in offenders.items() if v}, f"imports of benchmarks or tests from {folder}/"


def test_shipped_configs_name_no_benchmark_class():
    # A recipe's `class_path: benchmarks.x.Y` would make the shipped config need the scripts.
    files = [p for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    files += [p for p in (ROOT / "checkpoints").rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert files
    offenders = [str(p.relative_to(ROOT)) for p in files if re.search(r"\b(benchmarks|tests)\.\w", p.read_text())]
    assert not offenders


def _edits_sys_path(tree: ast.AST) -> list[int]:
    """Lines that change `sys.path`: a method call on it (insert, append, extend, ...), an assignment to it or
    to an item of it, or an augmented assignment."""

    def is_sys_path(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "path"
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        )

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            if node.func.attr not in ("index", "count", "copy"):
                lines.append(node.lineno)
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if is_sys_path(target) or (isinstance(target, ast.Subscript) and is_sys_path(target.value)):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Delete):
            if any(isinstance(t, ast.Subscript) and is_sys_path(t.value) for t in node.targets):
                lines.append(node.lineno)
    return lines


def test_no_file_edits_sys_path():
    # Scripts run as `python -m benchmarks.<name>` / `python train/<x>.py` with the package installed; a path
    # edit would hide an import that only works from one directory.
    files = [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    files = [p for p in files if p.relative_to(ROOT).parts[0] not in ("out", "logs") and ".egg-info" not in str(p)]
    assert len(files) > 50
    offenders = {str(p.relative_to(ROOT)): lines for p in files if (lines := _edits_sys_path(ast.parse(p.read_text())))}
    assert not offenders


def test_the_checks_catch_what_they_look_for():
    # The checks above would pass vacuously if they recognised nothing: each finds its offence in a sample.
    tree = ast.parse(
        "import importlib, sys\n"
        "from benchmarks._harness import write_section\n"
        "importlib.import_module('tests.anchors.biformer_official')\n"
        "sys.path.insert(0, '.')\n"
        "sys.path[0] = '.'\n"
        "sys.path += ['.']\n"
        "sys.path.append('.')\n"
        "sys.path.index('.')\n"
    )
    assert sorted(_edits_sys_path(tree)) == [4, 5, 6, 7]
    assert {"benchmarks", "tests"} <= _imported_roots_of(tree)
