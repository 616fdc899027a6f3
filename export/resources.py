"""Peak resident memory of a block of work, for the progress lines users read."""
from __future__ import annotations

from pathlib import Path


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Measures the process's peak RSS inside a `with` block (Linux).

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark, so
    each network's figure is its own rather than the largest so far.
    """

    peak = 0

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux, or not permitted: the figure is then the process's peak
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _vm_hwm()


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"
