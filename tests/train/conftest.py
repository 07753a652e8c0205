"""Every training test leaves the process as it found it: seed_everything exports PL_GLOBAL_SEED /
PL_SEED_WORKERS and recipes set torch's thread count. A test module that drives a launcher in-process names its
command line in `CLI_ARGV`, so that the CLI parses the arguments it is given rather than pytest's."""

from __future__ import annotations

import os
import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_process_state(request, monkeypatch):
    argv = getattr(request.module, "CLI_ARGV", None)
    if argv is not None:
        monkeypatch.setattr(sys, "argv", list(argv))
    saved, threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(saved)
    torch.set_num_threads(threads)
