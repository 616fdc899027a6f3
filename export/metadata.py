"""Writing what an exported ONNX file records about itself (the keys are in contract.layout)."""
from __future__ import annotations

from pathlib import Path

import onnx

from contract.layout import DATA_FILE


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Merge `values` into the model's metadata_props (keys stay unique)."""
    merged = {p.key: p.value for p in model.metadata_props} | values
    del model.metadata_props[:]
    for key, value in merged.items():
        model.metadata_props.add(key=key, value=value)


def stamp(path: Path, values: dict[str, str]) -> None:
    """Add `values` to the metadata of the exported file at `path`, atomically."""
    external = (path.parent / DATA_FILE).exists()
    # Weights kept beside the graph stay where they are: only the graph is rewritten.
    model = onnx.load(str(path), load_external_data=not external)
    set_metadata(model, values)
    partial = path.with_name("model.onnx.partial")
    onnx.save_model(model, str(partial))
    partial.replace(path)  # atomic: never a half-written graph
