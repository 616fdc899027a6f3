"""Speech in as it is spoken, fragmented MP4 out as it is made: WebSocket /ws/live."""
import json
import os

import soundfile
from websockets.sync.client import connect

url = os.environ.get("MUSETALK_URL", "http://localhost:8080").replace("http", "ws", 1)
pcm, rate = soundfile.read(os.environ.get("MUSETALK_SPEECH", "stack/assets/demo_speech.flac"), dtype="int16")
key = os.environ.get("MUSETALK_API_KEY")  # your tenant's key (none for a front end without keys)
headers = {"Authorization": f"Bearer {key}"} if key else {}

with connect(f"{url}/ws/live?sample_rate={rate}", additional_headers=headers, max_size=None) as ws, \
        open("live.mp4", "wb") as video:
    for i in range(0, len(pcm), rate // 25):            # 40 ms at a time, as a live source sends it
        ws.send(pcm[i : i + rate // 25].tobytes())
    ws.send(json.dumps({"type": "end"}))
    for message in ws:                                  # the server closes the socket when done
        if isinstance(message, bytes):
            video.write(message)
        elif json.loads(message)["type"] in ("done", "error"):
            print(message)
