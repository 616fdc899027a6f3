"""Where exported files live in a Triton model repository, and what they record about themselves.

The exporter writes `<repository>/<model>/1/model.onnx` (with its weights in
`model.onnx.data` beside it when over protobuf's 2 GB) and stamps metadata into
each file; the local server and the launchers read it back from there.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

DATA_FILE = "model.onnx.data"  # weights beside the graph, for models over protobuf's 2 GB

# Metadata keys stamped into every exported ONNX file.
EXPORT_KEY = "musetalk.export"  # what the file was exported from (weights, format): the skip key
SYNTHETIC_KEY = "musetalk.synthetic"  # "true" for random weights: real timings, no lip sync
PROFILE_KEY = "musetalk.profile"  # "full" or "tiny"
# The CPU reduced-precision gate (export/precision.py): the decoded face's PSNR of
# the bf16 chain against fp32, and the verdict ("pass" or "fail") the local
# server follows when it chooses each model's runtime.
BF16_PSNR_KEY = "musetalk.cpu_bf16_face_psnr_db"
BF16_GATE_KEY = "musetalk.cpu_bf16_gate"


def model_path(repository: Path, name: str) -> Path:
    return Path(repository) / name / "1" / "model.onnx"


def read_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props, without reading weights stored beside it.

    Parsing still reads the weights stored inside the file (1 s for the VAE decoder),
    and the exporter, the precision gate and the local server each ask at start-up:
    the answer is kept while the file is unchanged."""
    stat = Path(path).stat()
    version = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return dict(_metadata(str(Path(path).resolve()), version))


@lru_cache(maxsize=32)
def _metadata(path: str, version: tuple) -> tuple[tuple[str, str], ...]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return tuple((p.key, p.value) for p in model.metadata_props)
