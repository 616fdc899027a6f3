"""Where exported files live in a Triton model repository (no heavy imports: the server side reads it)."""
from __future__ import annotations

from pathlib import Path

DATA_FILE = "model.onnx.data"  # weights beside the graph, for models over protobuf's 2 GB


def model_path(repository: Path, name: str) -> Path:
    return Path(repository) / name / "1" / "model.onnx"
