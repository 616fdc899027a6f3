"""What every committed result records: the machine it ran on and the command that made it."""
from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB"


def invocation(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return f"python -m {module}" + (f" {args}" if args else "")
