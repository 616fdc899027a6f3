"""The upstream guide's name for benchmarks/onnx_vs_pytorch.py: python benchmarks/benchmark_onnx_vs_pytorch.py"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.onnx_vs_pytorch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
