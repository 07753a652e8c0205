"""The benchmark scripts as their users run them: `python -m benchmarks.<name>` from the repository root.

Tests never import `benchmarks` (DESIGN.md: scripts, not a library; tests/test_import_direction.py checks it).
They run the scripts as programs, in child processes, and read what the scripts print and write.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))
SHIPPED = ROOT / "checkpoints" / "zoo-video-dit-digits"


def _python(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    full_env.pop("PYTHONPATH", None)  # the scripts must find `benchmarks` and `tests` from the working directory
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def test_every_script_starts_with_help():
    # What `python -m benchmarks.<name> --help` does for each script, in one interpreter (importing torch, timm and
    # Lightning once instead of once per script): a script whose imports broke fails here, not on a quiet night.
    assert len(SCRIPTS) >= 10, SCRIPTS
    code = textwrap.dedent(
        f"""
        import runpy, sys
        for name in {SCRIPTS!r}:
            sys.argv = ["-m", "--help"]
            try:
                runpy.run_module("benchmarks." + name, run_name="__main__", alter_sys=True)
            except SystemExit as exit:
                if exit.code not in (0, None):
                    raise
            print("STARTED", name, flush=True)
        """
    )
    proc = _python(["-c", code], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    started = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("STARTED ")]
    assert started == SCRIPTS
    assert proc.stdout.count("usage:") >= len(SCRIPTS)


def test_a_script_run_as_a_file_names_the_command_that_works():
    # `python benchmarks/x.py` cannot import `benchmarks` or `tests` without editing sys.path, which no script does;
    # it says how to run it instead of failing on an import.
    for name in SCRIPTS:
        proc = _python([f"benchmarks/{name}.py", "--help"], timeout=60)
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        assert f"run from the repository root as: python -m benchmarks.{name}" in proc.stderr, proc.stderr


def _fake_run(directory: Path, attention: str, seed: int, level_bounds: list[float]) -> Path:
    """A training run's log directory as train/video_dit.py leaves it, around the shipped pipeline."""
    directory.mkdir(parents=True)
    (directory / "pipeline").symlink_to(SHIPPED, target_is_directory=True)
    config = yaml.safe_load((ROOT / "configs" / "video" / "video_dit_digits.yaml").read_text())
    config["seed_everything"] = seed
    config["model"]["attention"] = attention
    config["model"]["psa_config"]["level_bounds"] = level_bounds
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"steps": 10, "train_seconds": 5.0, "steps_per_second": 2.0, "parameters": 730000}
    (directory / "training_summary.json").write_text(json.dumps(summary))
    return directory


def test_video_benchmark_names_runs_and_stamps_its_command(tmp_path):
    # Rows of other training runs are named from the run's saved config, and the BENCHMARKS.md stamp carries
    # the command and arguments the section was measured with (quoted), so that it can be re-run.
    psa = _fake_run(tmp_path / "runs" / "a b", "psa", 0, [0.5, 0.75, 0.875, 1.0])
    dense = _fake_run(tmp_path / "runs" / "dense", "dense", 0, [0.5, 0.75, 0.875, 1.0])
    dense_seed = _fake_run(tmp_path / "runs" / "dense1", "dense", 1, [0.5, 0.75, 0.875, 1.0])
    other_psa = _fake_run(tmp_path / "runs" / "psa2", "psa", 0, [0.5, 0.75, 1, 1])
    args = ["--psa", str(psa), "--dense", str(dense), "--also", str(dense_seed), str(other_psa)]
    args += ["--per-class", "1", "--steps", "1", "--guidance", "8", "--evaluator-steps", "20"]
    out = tmp_path / "BENCHMARKS.md"
    proc = _python(["-m", "benchmarks.video_dit_digits", *args], timeout=600, env={"ZOO_BENCHMARKS_MD": str(out)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert "<!-- begin video_dit_digits -->" in text and "<!-- end video_dit_digits -->" in text
    assert f"command: `{shlex.join(['python', '-m', 'benchmarks.video_dit_digits', *args])}`;" in text
    assert f"--psa '{psa}'" in text
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "real clips (train digits)",
        "PSA",
        "dense",
        "dense, training seed 1",
        "PSA level_bounds [0.5, 0.75, 1, 1], training seed 0",
    ], rows
