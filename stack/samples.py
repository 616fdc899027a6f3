"""The recordings the launchers, benchmarks and tests speak with (stack/assets/, packaged with stack)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

ASSETS = Path(str(files("stack") / "assets"))
SPEECH = ASSETS / "speech.flac"  # 5.6 s of English speech (espeak-ng), 22.05 kHz mono FLAC
DEMO_SPEECH = ASSETS / "demo_speech.flac"  # what `make demo` says
