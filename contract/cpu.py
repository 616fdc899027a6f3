"""What this machine's CPU can do, for choosing how a model runs and for naming every CPU figure.

Machines that look alike are not: the same 2-core VM may be an AMD EPYC with AVX-512 BF16
(bf16 halves the UNet and VAE decoder's cost) or an Intel Xeon with AVX-512 and VNNI but
no bf16 instructions (bf16 there is emulated: many times slower than fp32). So nothing
assumes the CPU; this module reads it.

`capabilities()` answers in OpenVINO's words (its CPU plugin's OPTIMIZATION_CAPABILITIES:
"FP32", "BF16", "INT8", ...), asked of OpenVINO when it is installed, else read from the
kernel's CPU flags. MUSETALK_CPU_CAPABILITIES (e.g. "FP32,INT8") overrides both: to serve
a CPU as if it lacked bf16 (the tests do), or to correct a detection that is wrong.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

OVERRIDE = "MUSETALK_CPU_CAPABILITIES"
# The kernel's flags that decide which precisions run natively, and the name each goes by.
FLAGS_THAT_MATTER = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "avx512_vnni": "AVX512-VNNI",
                     "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8", "avx512f": "AVX-512", "avx2": "AVX2"}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def model_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def capabilities() -> set[str]:
    """The precisions this CPU runs natively, in OpenVINO's words ({"FP32", "BF16", "INT8", ...})."""
    if os.environ.get(OVERRIDE):
        return {c.strip().upper() for c in os.environ[OVERRIDE].split(",") if c.strip()}
    return set(_detected())


@lru_cache(maxsize=1)
def _detected() -> tuple[str, ...]:
    try:
        import openvino as ov

        return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - no OpenVINO here (the client, the front end): the kernel's flags
        have = flags()
        found = {"FP32"}
        if have & {"avx512_bf16", "amx_bf16"}:
            found.add("BF16")
        if have & {"avx512_vnni", "avx_vnni", "amx_int8"}:
            found.add("INT8")
        return tuple(sorted(found))


def describe() -> str:
    """"AMD EPYC (AVX-512, AVX512-BF16, AVX512-VNNI; no AMX-BF16)": the model and what decides its speed."""
    have = flags()
    present = [name for flag, name in FLAGS_THAT_MATTER.items() if flag in have]
    absent = [name for flag, name in FLAGS_THAT_MATTER.items()
              if flag not in have and flag in ("avx512_bf16", "amx_bf16", "avx512_vnni")]
    detail = ", ".join(present) + (f"; no {', '.join(absent)}" if absent else "")
    return f"{model_name()} ({detail})" if detail else model_name()
