"""Watching a run from outside: memory of a process tree, and the round lines.

Benchmarks and scenarios drive the real app through ``flwr run``; what they can
observe is the SuperLink's process tree (server, simulation, Ray workers) and the
one line the ServerApp logs per round (``apps.server_app``'s ``on_round``)::

    round 3/10: 50/50 nodes replied, train loss 0.4123, central accuracy 0.8012
    (loss 0.5311), version v0003, 12.4 s

:func:`parse_round_line` reads that line back; :class:`TreeRss` samples memory.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedobj.superlink import descendants

ROUND_LINE = re.compile(
    r"round (\d+)/(\d+): (\d+)/(\d+) nodes replied.*?train loss ([\d.na/]+), "
    r"central accuracy ([\d.]+) \(loss ([\d.]+)\)(?:, version \S+)?, ([\d.]+) s"
)


@dataclass(frozen=True)
class RoundLine:
    """One round as the ServerApp logged it."""

    round: int
    rounds: int
    replied: int
    sampled: int
    central_accuracy: float
    central_loss: float
    seconds: float


def parse_round_line(line: str) -> RoundLine | None:
    """The round in a ServerApp log line, or None if the line is not one."""
    m = ROUND_LINE.search(line)
    if m is None:
        return None
    return RoundLine(
        round=int(m.group(1)),
        rounds=int(m.group(2)),
        replied=int(m.group(3)),
        sampled=int(m.group(4)),
        central_accuracy=float(m.group(6)),
        central_loss=float(m.group(7)),
        seconds=float(m.group(8)),
    )


def rss_kib(pid: int) -> int:
    """Resident memory of one process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeRss(threading.Thread):
    """Samples the summed RSS of a process tree every ``interval_s``.

    ``peak_kib`` is the peak since start; :meth:`take_window_peak` returns the
    peak since the previous call, so a caller can record memory per round and
    see whether it grows round over round.
    """

    def __init__(self, root_pid: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peak_kib = 0
        self._window_kib = 0
        self._lock = threading.Lock()
        self.stopped = False

    def run(self) -> None:
        while not self.stopped:
            pids = {self.root_pid} | descendants(self.root_pid)
            now = sum(rss_kib(p) for p in pids)
            with self._lock:
                self.peak_kib = max(self.peak_kib, now)
                self._window_kib = max(self._window_kib, now)
            time.sleep(self.interval_s)

    def take_window_peak(self) -> int:
        """Peak KiB since the last call (or the start)."""
        with self._lock:
            peak, self._window_kib = self._window_kib, 0
        return peak
