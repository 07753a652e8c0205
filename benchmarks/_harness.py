"""Measuring helpers shared by the benchmark scripts: CPU throughput and peak memory of a callable,
each measurement in a fresh process, and writing a named section of BENCHMARKS.md.

The scripts are modules of the `benchmarks` package of the repository (not installed), run from the repository
root as `python -m benchmarks.<name>`: that is how they import this module and the anchors in `tests.anchors`
without editing `sys.path`. Nothing outside `benchmarks/` imports them; tests run them as programs.
`ZOO_BENCHMARKS_MD=<file>` sends the sections to another file than the repository's BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = Path(os.environ.get("ZOO_BENCHMARKS_MD") or ROOT / "BENCHMARKS.md")

__all__ = ["alternate", "machine_description", "measure_in_subprocess", "time_callable", "write_section"]


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_callable(fn: Callable[[], object], warmup: int = 2, iters: int = 5, min_time: float = 1.0) -> float:
    """Median seconds per call of fn, after warm-up; runs at least `iters` times and `min_time` seconds."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def alternate(first: Callable[[], object], second: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median seconds of each callable over `rounds` alternated calls, after one warm-up call each.

    Alternating in one process puts both sides under the same load, caches and clocks.
    """
    first(), second()
    a, b = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        a.append(t1 - t0)
        b.append(time.perf_counter() - t1)
    a.sort(), b.sort()
    return a[len(a) // 2], b[len(b) // 2]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(setup: Callable[[], Callable[[], object]], threads: int, warmup: int, iters: int, queue) -> None:
    torch.set_num_threads(threads)
    fn = setup()
    base = _rss_mb()
    fn()  # first call: the peak of one call over the resident set after setup
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    seconds = time_callable(fn, warmup=warmup, iters=iters)
    queue.put((seconds, max(peak, 0.0)))


def measure_in_subprocess(
    setup: Callable[[], Callable[[], object]], threads: int = 2, warmup: int = 2, iters: int = 5
) -> tuple[float, float]:
    """Run `setup()` in a fresh process, then time the callable it returns.

    `setup` must be picklable (a module-level function or a functools.partial of one).

    Returns:
        (median seconds per call, peak resident memory of one call above the post-setup level, in MiB).
    """
    return in_fresh_process(_child, setup, threads, warmup, iters)


def in_fresh_process(target: Callable[..., None], *args):
    """`target(*args, queue)` in a fresh (spawned) process; returns what it puts on the queue.

    Fresh, not forked: Linux carries a process's peak RSS across fork and exec, and a parent grown by building
    models would show up in every memory measurement of its children. `target` must be picklable.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _command(name: str) -> str:
    """The command that reproduces a section: the running benchmark script with its arguments, or, when the
    writer is not a script of `benchmarks/` (an interactive session), the script named like the section."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.parent == ROOT / "benchmarks" and script.suffix == ".py":
        return shlex.join(["python", "-m", f"benchmarks.{script.stem}", *sys.argv[1:]])
    return f"python -m benchmarks.{name}"


def write_section(name: str, markdown: str, title: str | None = None) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md, stamped with date, commit and machine."""
    command = _command(name)
    stamp = (
        f"_Measured {datetime.date.today().isoformat()} at commit `{git_commit()}` on {machine_description()}; "
        f"command: `{command}`; 1-minute load average when written: {os.getloadavg()[0]:.1f} "
        f"(above the core count means other jobs shared the CPU and absolute figures are low)._"
    )
    body = f"<!-- begin {name} -->\n## {title or name}\n\n{stamp}\n\n{markdown.strip()}\n<!-- end {name} -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n\nWhat is true now.\n"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    tmp = BENCHMARKS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS_MD)
