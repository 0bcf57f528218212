"""Peak memory of a child process, sampled from /proc (shared by the large-input benchmarks)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path


def sample_memory(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    """Keep the highest VmRSS and RssAnon (bytes) of ``pid`` in ``peaks`` until ``stop`` is set."""
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon"):
                peaks[key] = max(peaks.get(key, 0), int(line.split()[1]) * 1024)
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
