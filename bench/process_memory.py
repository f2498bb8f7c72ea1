"""Run a command and sample the resident memory of its whole process tree (peak total and peak per process).

Besides RSS, each process's private memory is tracked as RSS minus its resident shared pages:
pages of memory-mapped files (graph rows, embeddings) count in RSS once touched although they
are the kernel's shared, evictable page cache.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class MemoryPeaks:
    total_bytes: int = 0
    # pid -> (command line, peak RSS bytes)
    per_process: dict[int, tuple[str, int]] = field(default_factory=dict)
    # pid -> peak private bytes (RSS minus resident shared and file-backed pages)
    private: dict[int, int] = field(default_factory=dict)
    # pid -> (parent pid, the RANK in its environment or None): which process is which torchrun rank
    origin: dict[int, tuple[int, str | None]] = field(default_factory=dict)

    def largest(self, contains: str = "") -> int:
        return max((rss for cmd, rss in self.per_process.values() if contains in cmd), default=0)


def run_measured(command: list[str], interval: float = 0.2, **popen) -> tuple[int, float, MemoryPeaks, str]:
    """(return code, wall seconds, memory peaks, combined output) of `command`."""
    peaks = MemoryPeaks()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            # A child exited while the tree was walked (loader workers come and go): sample again,
            # never stop early, or the peaks would be those of start-up.
            time.sleep(interval)
            continue
        total = 0
        for proc in tree:
            try:
                info = proc.memory_info()
                rss, private = info.rss, info.rss - info.shared
                cmd = " ".join(proc.cmdline())[:200]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            # Keep the first command line seen: an exiting (zombie) process reports an empty one.
            first_cmd, previous = peaks.per_process.get(proc.pid, (cmd, 0))
            peaks.per_process[proc.pid] = (first_cmd or cmd, max(previous, rss))
            peaks.private[proc.pid] = max(peaks.private.get(proc.pid, 0), private)
            if proc.pid not in peaks.origin:
                try:
                    peaks.origin[proc.pid] = (proc.ppid(), proc.environ().get("RANK"))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        peaks.total_bytes = max(peaks.total_bytes, total)
        time.sleep(interval)
    reader.join()
    return process.returncode, time.perf_counter() - started, peaks, "".join(output)
