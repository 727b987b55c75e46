"""What tests read about a process from /proc (Linux): its resident memory."""

from __future__ import annotations

import os
from pathlib import Path


def rss_mib(pid: int | None = None) -> float:
    """Resident set size in MiB of process `pid` (this process when None)."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")
