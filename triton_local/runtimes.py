"""Which runtime the local server uses for each model (see python_model.py)."""
from triton_local.repository import Runtime

# fp32 onnxruntime everywhere: the reference. benchmarks/onnx_vs_pytorch.py
# measures the alternatives.
DEFAULT_RUNTIMES: dict[str, Runtime] = {}
