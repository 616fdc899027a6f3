"""What every committed result records: the machine it ran on and the command that made it."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from contract import cpu


def machine() -> str:
    """"AMD EPYC (AVX-512, AVX512-BF16, AVX512-VNNI; no AMX-BF16), 2 cores, 24 GiB": the CPU with the
    flags that decide its speed (the same VM size may be a CPU with bf16 or one without)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    host = f"{cpu.describe()}, {os.cpu_count()} cores, {memory:.0f} GiB"
    return f"{gpu}; host {host}" if (gpu := gpus()) else host


def gpus() -> str:
    """"NVIDIA H200 (143771 MiB, driver 580.159.03)" for each GPU nvidia-smi lists; "" without one."""
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    rows = [[field.strip() for field in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    return ", ".join(f"{name} ({memory}, driver {driver})" for name, memory, driver in rows if out.returncode == 0)


def invocation(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return f"python -m {module}" + (f" {args}" if args else "")


PROVENANCE = {"produced by": "command", "machine": "machine", "date": "date"}


def publish(table: Path, lines: list[str], data) -> Path:
    """Write a result: the Markdown `table` (its lines) and the same figures as JSON beside it,
    with the table's provenance lines (the command, the machine with its CPU flags and GPU, the
    date) under "provenance"."""
    provenance = {}
    for line in lines:
        for label, key in PROVENANCE.items():
            if line.startswith(f"- {label}: "):
                value = line[len(label) + 4:].strip().strip("`")
                provenance[key] = value.split(";")[0] if key == "date" else value  # "date: ...; more"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(lines) + "\n")
    if isinstance(data, dict) and provenance:
        data = {"provenance": provenance, **data}
    table.with_suffix(".json").write_text(json.dumps(data, indent=1))
    return table
