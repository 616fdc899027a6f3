"""What the launchers serve: the exported networks of a profile, exported first when needed."""
from __future__ import annotations

from pathlib import Path

from export.architectures import PROFILES
from triton_local.server import BUILD

__all__ = ["PROFILES", "default_repository", "real_weights", "ensure_exported"]

WEIGHTS = Path("models")


def real_weights(profile: str) -> bool:
    """MuseTalk's checkpoints are in models/ (and the profile is the real architecture)."""
    return profile == "full" and (WEIGHTS / "musetalkV15" / "unet.pth").is_file()


def default_repository(profile: str) -> Path:
    return Path("model_repository") if profile == "full" else BUILD / f"{profile}_onnx"


def ensure_exported(profile: str, repository: Path | None = None) -> Path | None:
    """Export the networks (skipped when up to date) and return where they are; None on failure."""
    from export.__main__ import main as export_main

    repository = repository or default_repository(profile)
    source = ["--weights", str(WEIGHTS)] if real_weights(profile) else ["--synthetic", "--profile", profile]
    return repository if export_main([*source, "--repository", str(repository)]) == 0 else None
