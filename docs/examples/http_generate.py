"""Speech in, an mp4 of the avatar speaking it out: POST /onnx-infer."""
import json
import os
from pathlib import Path

import httpx

url = os.environ.get("MUSETALK_URL", "http://localhost:8080")
speech = Path(os.environ.get("MUSETALK_SPEECH", "stack/assets/demo_speech.flac"))
key = os.environ.get("MUSETALK_API_KEY")  # your tenant's key (none for a front end without keys)
headers = {"Authorization": f"Bearer {key}"} if key else {}

answer = httpx.post(f"{url}/onnx-infer", data={"fps": "25"}, headers=headers,
                    files={"audio_file": (speech.name, speech.read_bytes())}, timeout=None)
if answer.status_code != 200:  # the error is JSON: {"error": "...what was wrong..."}
    raise SystemExit(f"{answer.status_code}: {answer.json()['error']}")
Path("speaking.mp4").write_bytes(answer.content)  # H.264 + AAC
timings = json.loads(answer.headers["X-Timings"])
print(f"{answer.headers['X-Frame-Count']} frames in {timings['total']:.1f} s -> speaking.mp4")
