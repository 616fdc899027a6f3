"""The images cannot be built here (no Docker engine): lint both Dockerfiles, and check
Dockerfile.triton's promises (tests/test_deploy.py checks the front end's)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from support import ROOT

DOCKERFILE = ROOT / "Dockerfile.triton"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.triton", "Dockerfile"])
def test_hadolint_passes(dockerfile):
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_tritonserver_non_root_with_health_check():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3$", text, re.M)
    assert re.search(r"^ARG TRITON_VERSION=\d\d\.\d\d$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users[-1] == "${TRITON_UID}" and "ARG TRITON_UID=1000" in text  # triton-server
    assert "/v2/health/ready" in text and "HEALTHCHECK" in text
    # The engine cache path of the configs exists in the image.
    for model in ("unet", "vae_decoder"):
        config = (ROOT / "model_repository" / model / "config.pbtxt").read_text()
        assert f"/cache/trt/{model}" in config and f"/cache/trt/{model}" in text
