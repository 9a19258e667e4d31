"""Helpers the benchmark scripts share (each script runs as `python benchmarks/NAME.py`)."""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used, from /proc (Linux); 0 when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


@contextmanager
def collector_paused():
    """The benchmark process's own garbage collector off for a timed stretch (collected first). Its client
    threads share one interpreter, so a full collection stops every client's clock at once; what they make
    in a stretch is freed by reference counting anyway."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
