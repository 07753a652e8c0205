"""Benchmark scripts: scripts, not a library.

Each module is a program, run from the repository root as `python -m benchmarks.<name>` (this package is not
installed, and no script edits `sys.path`). Scripts may import the package (`zoo`, `blocks`, `kernels`), each
other's helpers (`benchmarks._harness`) and the tests' official-code anchors (`tests.anchors`); nothing else
imports them: an evaluator or anchor that tests or shipped artefacts need lives in `zoo.evaluation` or
`tests/anchors/` (tests/test_import_direction.py checks it).
"""
