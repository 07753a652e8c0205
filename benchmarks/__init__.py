"""Benchmark scripts: scripts, not a library.

Each module is a program, run from the repository root as `python -m benchmarks.<name>` (this package is not
installed, and no script edits `sys.path`). Scripts may import the package (`zoo`, `zoo.blocks`, `zoo.kernels`),
each other's helpers (`benchmarks._harness`) and what the tests hold for them: the official-code anchors
(`tests.anchors`) and the tiny diffusers video models (`tests.zoo._video_models`). Nothing else imports the
scripts: an evaluator or anchor that tests or shipped artefacts need lives in `zoo.evaluation` or
`tests/anchors/` (tests/test_import_direction.py checks it).
"""
