"""Front-end settings, from environment variables (MUSETALK_*) with sensible defaults."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path


def _env(name: str, default):
    value = os.environ.get(f"MUSETALK_{name.upper()}")
    if value is None:
        return default
    return type(default)(value) if not isinstance(default, Path) else Path(value)


@dataclass(frozen=True)
class Settings:
    triton_url: str = "localhost:8001"
    triton_protocol: str = "grpc"
    avatar_dir: Path = Path("data/avatars")
    default_avatar: str = "default"
    # An image or video prepared as the default avatar at start-up when missing ("" = none).
    default_avatar_source: str = ""
    max_audio_seconds: float = 120.0
    max_upload_mb: float = 50.0
    max_avatar_frames: int = 250
    batch_size: int = 16
    in_flight: int = 4
    x264_preset: str = "veryfast"

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        values = {f.name: _env(f.name, f.default) for f in fields(cls)}
        return cls(**{**values, **overrides})
