"""What the benches read of other processes (CPU, memory), straight from /proc and cheaply.

On two cores a monitor competes with what it measures: psutil's `children()` and `process_iter()` read every
process on the machine at each sample, which cost the import bench's two sampling threads ~23% of a core
(2.27 s of CPU in 10 s, 2026-12-07). Here each sample lists /proc once and reads only the processes it follows;
one it has classified is not read again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["DbCpu", "TreeRss", "cpu_seconds"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU seconds so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class _Sampler:
    def __init__(self, interval: float) -> None:
        self._interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class DbCpu(_Sampler):
    """CPU seconds of the PostgreSQL backends serving one database, on a server shared with other work (only
    ours count). A backend is one whose title names the database; one born during the measure counts from zero;
    one that ends between two samples loses at most the interval (0.1 s)."""

    def __init__(self, db: str, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.marker, self.seconds = f" {db} ".encode(), 0.0
        self._seen: dict[int, tuple[float, float]] = {}  # pid -> (CPU at the start or 0 if born since, last read)
        self._others: set[int] = set()                   # looked at and not ours, for good
        self._started = False

    def start(self) -> None:
        super().start()
        self._started = True

    def stop(self) -> None:
        super().stop()
        self.seconds = round(sum(last - first for first, last in self._seen.values()), 1)

    def __enter__(self) -> DbCpu:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sample(self) -> None:
        for pid in _pids():
            if pid in self._others:
                continue
            try:
                if pid not in self._seen:
                    if not self._ours(pid):
                        continue
                    cpu = cpu_seconds(pid)
                    self._seen[pid] = (0.0 if self._started else cpu, cpu)
                else:
                    self._seen[pid] = (self._seen[pid][0], cpu_seconds(pid))
            except (OSError, ValueError):
                continue  # ended: its last reading stays

    def _ours(self, pid: int) -> bool:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
            self._others.add(pid)
            return False
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if self.marker in title:
            return True
        if title.startswith(b"postgres: "):  # its title is set: another database's backend or a server process
            self._others.add(pid)
        return False  # else just forked, title not set yet: looked at again next time


class TreeRss(_Sampler):
    """Peak of the summed RSS of a process and its descendants, sampled every 20 ms; and each one's own peak
    (the kernel's high-water mark, VmHWM, so it misses nothing between samples)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(interval)
        self.peak = 0
        self.per_process: dict[int, int] = {}  # pid -> its own peak
        self._tree, self._others = {pid}, set()
        self._samples = 0

    def sample(self) -> None:
        if self._samples % 10 == 0:  # new processes looked for every 0.2 s: the ones that count live for seconds
            self._discover()
        self._samples += 1
        total = 0
        for pid in self._tree:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue  # ended: its peak stays
            fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM")))
            if "VmRSS" not in fields:
                continue  # a zombie
            total += int(fields["VmRSS"].split()[0]) * 1024
            self.per_process[pid] = max(self.per_process.get(pid, 0), int(fields["VmHWM"].split()[0]) * 1024)
        self.peak = max(self.peak, total)

    def _discover(self) -> None:
        for pid in _pids():  # listed in increasing order: a parent before its children (unless the pids wrapped)
            if pid in self._tree or pid in self._others:
                continue
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            (self._tree if parent in self._tree else self._others).add(pid)
