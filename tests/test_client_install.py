"""The client SDK installs alone (numpy and tritonclient, nothing heavy) and calls Triton."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib

from support import ROOT

# What a wheel of this project is built from: pyproject.toml and every package it names.
SOURCES = ["pyproject.toml", *sorted({p.split(".")[0] for p in tomllib.loads(
    (ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]})]
PROBE = """
import importlib.util, sys
import numpy as np
from client import MuseTalkClient
heavy = [m for m in ("torch", "onnx", "onnxruntime", "fastapi", "cv2", "diffusers") if importlib.util.find_spec(m)]
assert not heavy, f"the client install pulled {heavy}"
rng = np.random.default_rng(0)
audio = rng.standard_normal((3, 50, 384)).astype(np.float32)
latents = rng.standard_normal((3, 8, 32, 32)).astype(np.float32)
with MuseTalkClient(sys.argv[1]) as tc:
    tc.wait_until_ready(timeout_s=30)
    faces = tc.musetalk(audio, latents)
print(faces.shape, faces.dtype)
"""


def test_client_installs_alone_and_calls_the_local_triton(triton, tmp_path):
    source = tmp_path / "src"  # a copy: building a wheel in the checkout would write into it
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    constraints = str(ROOT / "constraints.txt")  # the versions the project installs (the SDK asks for ranges)
    install = subprocess.run([python, "-m", "pip", "install", "-q", "-c", constraints, str(source)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    run = subprocess.run([python, "-c", PROBE, triton.grpc_url], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("(3, 256, 256, 3) uint8")
