"""Anchors: the authors' computations re-expressed over our weights, the oracles the zoo is tested against.

The rule for where an oracle lives:

- An oracle only tests and benchmarks use lives here, in `tests/anchors/`, not in the package: no user calls it.
  Tests import it as `tests.anchors.<name>`; benchmark scripts, run as `python -m benchmarks.<name>` from the
  repository root, import it the same way, as a plain package (no `sys.path` edits anywhere).
- An evaluator a user of a shipped artefact needs (the moving-digits reader that judges the video checkpoint)
  lives in the package, `zoo.evaluation`.
- Nothing in `zoo/`, `blocks/`, `kernels/` or `train/` imports `tests` or `benchmarks`, and nothing in `tests/`
  imports `benchmarks` (tests/test_import_direction.py checks both).
"""
