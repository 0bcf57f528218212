"""Peak memory of a child process, sampled from /proc (shared by the large-input benchmarks)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path


def memory_status(pid: int | str = "self") -> dict[str, int]:
    """The memory fields of ``/proc/<pid>/status`` (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def sample_memory(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    """Keep the highest VmRSS and RssAnon (bytes) of ``pid`` in ``peaks`` until ``stop`` is set."""
    while not stop.is_set():
        try:
            status = memory_status(pid)
        except OSError:
            return
        for key in ("VmRSS", "RssAnon"):
            if key in status:
                peaks[key] = max(peaks.get(key, 0), status[key])
        time.sleep(0.05)


def run_measured(cmd: list[str]) -> tuple[int, str, float, dict[str, int]]:
    """Run ``cmd``; return its exit code, stdout, wall seconds and peak memory (RssAnon: private memory the
    process allocated; VmRSS: that plus resident pages of memory-mapped files, which the kernel can drop)."""
    peaks: dict[str, int] = {}
    stop = threading.Event()
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=sample_memory, args=(child.pid, peaks, stop))
    sampler.start()
    stdout, _ = child.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return child.returncode, stdout, seconds, peaks
