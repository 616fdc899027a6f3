"""The environment variables the project reads besides the front end's settings (those are
frontend/settings.py's, MUSETALK_<field>): declared here once, with who reads them, so that the
settings reference lists every MUSETALK_* variable (the docs' hook renders both, and a test finds
any variable the code reads that neither declares)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    read_by: str
    what: str


VARIABLES = (
    Variable("MUSETALK_LOG_FORMAT", "text", "every process (contract.logs)",
             "`text` or `json` (one object a line, for log collectors)"),
    Variable("MUSETALK_LOG_LEVEL", "INFO", "every process (contract.logs)", "DEBUG, INFO, WARNING or ERROR"),
    Variable("MUSETALK_API_KEY", "unset", "the SDK's client.sessions, the Pipecat service, the docs' examples",
             "the tenant's API key sent to a front end with keys (Authorization: Bearer)"),
    Variable("MUSETALK_URL", "http://localhost:8080", "the docs' examples", "the front end they call"),
    Variable("MUSETALK_SPEECH", "stack/assets/demo_speech.flac", "the docs' examples", "the speech they send"),
    Variable("MUSETALK_LOCAL_DEVICE", "auto", "the local server (triton_local.runtimes)",
             "`auto` (the GPU where a probe session gets onnxruntime's CUDA provider), `cpu`, or `cuda` (insist)"),
    Variable("MUSETALK_CPU_PRECISION", "auto", "the local server (triton_local.runtimes)",
             "`auto` (bf16 where the export's gate passed and the CPU has native bf16), `fp32`, or `bf16`"),
    Variable("MUSETALK_CPU_CAPABILITIES", "detected", "the local server (contract.cpu)",
             "what the CPU is believed to do, as OpenVINO names it (e.g. `FP32,INT8`: a CPU without bf16)"),
    Variable("MUSETALK_TRITON_VENV", ".venv-triton", "the local server (triton_local.server)",
             "the Python environment tritonserver's python backend runs in"),
    Variable("MUSETALK_SKIP_BROWSER_TESTS", "unset", "the tests", "`1` skips the page tests where Chromium is missing"),
)
