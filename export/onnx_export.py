"""Export one network to ONNX, gate it on parity with PyTorch, and put it where Triton looks.

Every step of one network happens in a staging folder beside the target; only
an export that passed its parity gate is moved to `<repository>/<name>/1/`.
An export whose recorded key (weights, profile, format) matches the request is
skipped, so a second run costs seconds.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from contract.layout import DATA_FILE, EXPORT_KEY, PROFILE_KEY, SYNTHETIC_KEY, model_path, read_metadata
from export.checkpoints import WeightSource
from export.metadata import set_metadata
from export.onnx_configs import OnnxConfig
from export.resources import PeakMemory

# Bump when a graph changes in a way the weights key cannot see.
EXPORT_FORMAT = 4
OPSET = 17
PARITY_BATCHES = (1, 3)


class ParityError(RuntimeError):
    """The exported graph does not compute what its PyTorch module computes."""


@dataclass
class ParityReport:
    network: str
    rows: list[dict] = field(default_factory=list)
    passed: bool = True

    def lines(self) -> list[str]:
        return [
            f"  parity {self.network}.{r['output']} batch {r['batch']}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k not in ("output", "batch", "ok"))
            + ("" if r["ok"] else "  <-- over tolerance")
            for r in self.rows
        ]


@dataclass
class ExportResult:
    network: str
    path: Path
    skipped: bool
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    file_bytes: int = 0
    parity: ParityReport | None = None


def export_key(config: OnnxConfig, source: WeightSource) -> str:
    key = {"format": EXPORT_FORMAT, "opset": OPSET, "network": config.name}
    if config.component:
        key.update(source.describe(config.component))
    return json.dumps(key, sort_keys=True)


def recorded_key(path: Path) -> str | None:
    """The export key stored in an existing ONNX file, or None if unreadable."""
    try:
        return read_metadata(path).get(EXPORT_KEY)
    except Exception:  # noqa: BLE001 - a damaged file is simply redone
        return None


def export_network(
    config: OnnxConfig,
    source: WeightSource,
    repository: Path,
    force: bool = False,
    load: Callable[[str], torch.nn.Module] | None = None,
) -> ExportResult:
    """Export `config`'s network from `source` into `repository`, unless already there.

    `load` gives the weights of a component (default `source.load`); a caller
    exporting several networks passes one that keeps a shared component loaded.
    """
    target = model_path(repository, config.name)
    key = export_key(config, source)
    complete = target.is_file() and (
        not config.external_data or (target.parent / DATA_FILE).is_file()
    )
    if not force and complete and recorded_key(target) == key:
        return ExportResult(config.name, target, skipped=True, file_bytes=_size(target))

    started = time.perf_counter()
    with PeakMemory() as memory:
        load = load or source.load
        module = config.build(load(config.component) if config.component else None).eval()
        staging = target.parent / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            staged = staging / "model.onnx"
            _torch_export(config, module, staged)
            _finish(staged, config, key, source)
            report = check_parity(config, module, staged)
            if not report.passed:
                raise ParityError(
                    f"{config.name}: the ONNX export disagrees with PyTorch beyond tolerance; "
                    "nothing was written.\n" + "\n".join(report.lines())
                )
            _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(
        config.name, target, skipped=False, seconds=time.perf_counter() - started,
        peak_rss_bytes=memory.peak, file_bytes=_size(target), parity=report,
    )


def _torch_export(config: OnnxConfig, module: torch.nn.Module, path: Path) -> None:
    # Batch 2 so that tracing cannot specialise the batch dimension to 1. The
    # TorchScript exporter is used: it wrote the full UNet in 33 s where the
    # dynamo exporter took longer and its session needed more memory.
    sample = config.sample(2, torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings(), ExitStack() as rewritten:
        for rewrite in config.rewrites:
            rewritten.enter_context(rewrite(module))
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, sample, str(path),
            input_names=config.input_names, output_names=config.output_names,
            dynamic_axes=config.dynamic_axes, opset_version=OPSET,
            do_constant_folding=True, dynamo=False,
        )


def _finish(path: Path, config: OnnxConfig, key: str, source: WeightSource) -> None:
    """Record where the graph came from, and store large weights in one file beside it."""
    model = onnx.load(str(path))
    _declare_shapes(model, config)
    del model.metadata_props[:]  # nothing of the exporter's: only what we record
    set_metadata(model, {
        EXPORT_KEY: key,
        SYNTHETIC_KEY: str(source.synthetic).lower(),
        PROFILE_KEY: source.profile,
    })
    if source.synthetic:
        model.doc_string = "RANDOM WEIGHTS (--synthetic): real timings, meaningless outputs."
    for stale in path.parent.iterdir():  # the exporter may have written one file per tensor
        stale.unlink()
    onnx.save_model(
        model, str(path), save_as_external_data=config.external_data,
        all_tensors_to_one_file=True, location=DATA_FILE,
    )


def _declare_shapes(model: onnx.ModelProto, config: OnnxConfig) -> None:
    """Write the spec's shapes on the graph's inputs and outputs.

    Tracing leaves some output dims symbolic (the VAE encoder's batch split, for
    one); Triton and TensorRT profiles read these declarations, so they state
    the contract exactly: a dynamic batch, then the fixed dims of contract.specs.
    """
    declared = {t.name: t for t in (*config.spec.inputs, *config.spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        tensor = declared[value.name]
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        shape.dim.add().dim_param = "batch"
        for size in tensor.shape:
            shape.dim.add().dim_value = size


def check_parity(config: OnnxConfig, module: torch.nn.Module, path: Path) -> ParityReport:
    """Run PyTorch and onnxruntime on the same random inputs, at batch 1 and 3."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report = ParityReport(config.name)
    for batch in PARITY_BATCHES:
        inputs = config.sample(batch, torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {n: t.numpy() for n, t in zip(config.input_names, inputs)})
        for name, want, have in zip(config.output_names, expected, got):
            row = {"output": name, "batch": batch, **compare(want.numpy(), have, config)}
            report.rows.append(row)
            report.passed &= row["ok"]
    return report


def compare(expected: np.ndarray, actual: np.ndarray, config: OnnxConfig) -> dict:
    tol = config.tolerance
    if expected.shape != actual.shape:
        return {"ok": False, "shape_mismatch": 1.0}
    if expected.dtype == np.uint8:
        levels = np.abs(expected.astype(np.int16) - actual.astype(np.int16))
        fraction = float(np.mean(levels > 0))
        worst = int(levels.max())
        ok = worst <= tol.max_levels and fraction <= tol.max_fraction
        return {"ok": ok, "max_levels": worst, "fraction_differing": fraction}
    diff = actual.astype(np.float64) - expected.astype(np.float64)
    rel_l2 = float(np.linalg.norm(diff) / max(np.linalg.norm(expected), 1e-30))
    return {"ok": rel_l2 <= tol.rel_l2, "max_abs": float(np.abs(diff).max()), "rel_l2": rel_l2}


def _move_into_place(staging: Path, target: Path) -> None:
    # The graph goes last: a crash in between leaves no graph pointing at missing data.
    target.unlink(missing_ok=True)
    (target.parent / DATA_FILE).unlink(missing_ok=True)
    if (staging / DATA_FILE).exists():
        (staging / DATA_FILE).replace(target.parent / DATA_FILE)
    (staging / "model.onnx").replace(target)
    for path in target.parent.glob("model.onnx*"):
        path.chmod(0o644)  # onnx writes its data file 0600; the container's user must read it


def _size(path: Path) -> int:
    data = path.parent / DATA_FILE
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
