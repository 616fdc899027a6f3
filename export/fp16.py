"""fp16 copies of exported files, for GPUs: half the weights' bytes, tensor cores without TF32.

`to_fp16(source, target)` converts one exported file with onnxruntime's converter. Its
inputs and outputs stay as the contract declares them (fp32, uint8), so a copy drops into
the same Triton config and clients; weights and activations inside become fp16, except the
operators named in `keep_fp32`, which compute in fp32 between casts. By default those are
the normalisations: a variance sums squares, which overflow fp16's 65504 on activations
the convolutions before them leave in the hundreds.

The copy records what it was made from (the source's export key and the operators kept),
so it is remade only when the source or the choice changes. Files over protobuf's 2 GB
(the full UNet in fp32) are read and written with their weights beside the graph.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from contract.layout import DATA_FILE, EXPORT_KEY, read_metadata
from export.metadata import set_metadata

NORMALISATIONS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")
MADE_FROM_KEY = "musetalk.fp16_of"


def to_fp16(source: Path, target: Path, keep_fp32: tuple[str, ...] = NORMALISATIONS) -> Path:
    """`target` (a `<repository>/<model>/1/model.onnx` path): an fp16 copy of the exported
    file `source`, made unless already up to date."""
    source, target = Path(source), Path(target)
    made_from = json.dumps({"export": read_metadata(source).get(EXPORT_KEY), "fp32": sorted(keep_fp32)})
    if _made_from(target) == made_from:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # The converter needs every tensor's type; onnx infers them from the path, which
        # (unlike inferring on a loaded model) works past protobuf's 2 GB.
        inferred = Path(tmp) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
        load_external_data_for_model(model, str(source.parent))
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                         op_block_list=[*DEFAULT_OP_BLOCK_LIST, *keep_fp32])
        set_metadata(model, {MADE_FROM_KEY: made_from})
        for stale in (target, target.parent / DATA_FILE):
            stale.unlink(missing_ok=True)
        large = (source.parent / DATA_FILE).exists()
        onnx.save_model(model, str(target), save_as_external_data=large, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        for written in (target, target.parent / DATA_FILE):
            if written.exists():  # onnx writes weights owner-only: a server running as another user reads them
                written.chmod(0o644)
    return target


def _made_from(target: Path) -> str | None:
    try:
        return read_metadata(target).get(MADE_FROM_KEY)
    except Exception:  # noqa: BLE001 - absent or half-written: made again
        return None
