"""Helpers the test modules share (fixtures live in conftest.py).

Every random input comes from a generator seeded where it is used, so a test's
data never depends on which tests ran before it.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import soundfile

from contract.layout import model_path
from stack import samples

ROOT = Path(__file__).resolve().parent.parent
# The tenants of the front end with API keys (conftest.py's `keyed`); ops is an operator.
KEYS = {"alpha": "alpha-key-0123456789abcdef", "beta": "beta-key-0123456789abcdef",
        "ops": "ops-key-0123456789abcdef"}
KEYED_TOKEN_SECONDS = 10
KEYED_TENANT_LIVE_SESSIONS = 2
BUILD = ROOT / "build" / "test"
SPEECH = samples.SPEECH  # 5.6 s of real English speech (espeak-ng)


def eventually(fetch, until=bool, timeout: float = 30.0, every: float = 0.1, what: str = "the condition"):
    """The first value of `fetch()` that `until` accepts, polled every `every` s: the one way the
    tests wait for something. After `timeout` s an AssertionError says what was awaited and the
    last value seen: a regression fails, it never hangs."""
    from client.readiness import wait_for

    seen: list = [None]

    def check() -> bool:
        seen[0] = fetch()
        return until(seen[0])

    if not wait_for(check, timeout, every):
        raise AssertionError(f"{what}: not within {timeout:g} s; last seen: {str(seen[0])[:300]}")
    return seen[0]


async def eventually_async(fetch, until=bool, timeout: float = 30.0, every: float = 0.1,
                           what: str = "the condition"):
    """`eventually` for a coroutine function `fetch`, without blocking the event loop."""
    from client.readiness import wait_for_async

    seen: list = [None]

    async def check() -> bool:
        seen[0] = await fetch()
        return until(seen[0])

    if not await wait_for_async(check, timeout, every):
        raise AssertionError(f"{what}: not within {timeout:g} s; last seen: {str(seen[0])[:300]}")
    return seen[0]


def keys_file(path: Path, keys: dict[str, str]) -> None:
    """A front end's MUSETALK_API_KEYS_FILE of `keys` (tenant: key; "ops" an operator)."""
    lines = ["# tenants of the tests", ""] + [f"{tenant}:{key}" + (":operator" if tenant == "ops" else "")
                                             for tenant, key in keys.items()]
    path.write_text("\n".join(lines) + "\n")


def speech_seconds(path: Path = SPEECH) -> float:
    """The exact length of a speech fixture, read from the file."""
    info = soundfile.info(str(path))
    return info.frames / info.samplerate


def frames(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """n frames' worth of ensemble inputs: audio windows [n, 50, 384], latents [n, 8, 32, 32]."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 50, 384)).astype(np.float32),
            rng.standard_normal((n, 8, 32, 32)).astype(np.float32))


def local_chain(repository: Path, audio: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """The ensemble computed by onnxruntime on the same three ONNX files, chained by hand."""
    import onnxruntime as ort

    run = {n: ort.InferenceSession(str(model_path(repository, n)), providers=["CPUExecutionProvider"])
           for n in ("positional_encoding", "unet", "vae_decoder")}
    embedded = run["positional_encoding"].run(None, {"audio_chunk": audio})[0]
    pred = run["unet"].run(None, {"latents": latents, "audio_embedding": embedded})[0]
    return run["vae_decoder"].run(None, {"pred_latents": pred})[0]


def face_psnr(a: np.ndarray, b: np.ndarray) -> float:
    from export.precision import face_psnr as psnr

    return psnr(a, b)


def astronaut_head():
    """scikit-image's astronaut cropped around her head, with its 68 landmarks and face width."""
    import cv2
    import skimage.data

    from frontend.avatars.faces import LandmarkFinder

    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    landmarks = LandmarkFinder().find(photo)
    width = float(landmarks[:, 0].max() - landmarks[:, 0].min())  # jaw to jaw: 92 px
    cx, cy = landmarks.mean(axis=0)
    half = int(1.6 * width)
    x1, y1 = int(max(0, cx - half)), int(max(0, cy - half))
    return photo[y1 : int(cy + half), x1 : int(cx + half)], landmarks - (x1, y1), width


def face_on_canvas(width: int, height: int, face: float, shift: int = 0, background: int = 120):
    """A width x height frame with the astronaut's face `face` px wide (jaw to jaw) in it, and
    where her landmarks are."""
    import cv2

    head, landmarks, face_width = astronaut_head()
    k = face / face_width
    small = cv2.resize(head, None, fx=k, fy=k, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
    small = small[:height, : width - width // 3 - shift]
    canvas = np.full((height, width, 3), background, np.uint8)
    y0, x0 = (height - small.shape[0]) // 2, width // 3 + shift
    canvas[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    return canvas, landmarks * k + (x0, y0)


def video_bytes(frames, fps: int = 25, rotation: int = 0) -> bytes:
    """BGR frames as an H.264 mp4 (its display matrix turned `rotation` degrees counter-clockwise)."""
    import io

    import av

    buffer = io.BytesIO()
    height, width = frames[0].shape[:2]
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "16"}
        if rotation:
            stream.set_display_rotation(rotation)
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="bgr24")
            video_frame.pts = i
            out.mux(stream.encode(video_frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


# The face region of the video as shown, compared with a snapshot: how much the mouth moved.
CHANGED = """(reference) => {
    const video = document.querySelector('video');
    const canvas = document.createElement('canvas');
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    const context = canvas.getContext('2d');
    context.drawImage(video, 0, 0);
    const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const pixels = Array.from(rgba.filter((_, i) => i % 4 === 1));  // green: close to the luma
    if (!reference) return pixels;
    let worst = 0;
    const width = canvas.width, block = 16;
    for (let y = 0; y + block <= canvas.height; y += block) for (let x = 0; x + block <= width; x += block) {
        let sum = 0;
        for (let j = 0; j < block; j++) for (let i = 0; i < block; i++) {
            const k = (y + j) * width + x + i;
            sum += Math.abs(pixels[k] - reference[k]);
        }
        worst = Math.max(worst, sum / block / block);
    }
    return worst;
}"""


def mouth_moves(page, idle, seconds: float = 5.0) -> bool:
    """Whether the face shown differs from the idle one within `seconds` (speech has pauses,
    where the avatar shows its own face)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if page.evaluate(CHANGED, idle) > 12:
            return True
        page.wait_for_timeout(100)
    return False


def settled_count(grpc_url: str, model: str, quiet_s: float = 1.0, timeout_s: float = 20.0) -> int:
    """A model's inference count once it has stopped moving for `quiet_s`: requests already in
    a Triton batcher's queue when they were cancelled still run (the python backend takes its
    queue whole), so "nothing runs any more" is a count that settles, soon."""
    from client import MuseTalkClient

    with MuseTalkClient(grpc_url) as client:
        def count() -> int:
            return int(client.statistics(model).get("inference_count", 0))

        deadline, last = time.monotonic() + timeout_s, count()
        while True:
            time.sleep(quiet_s)
            now = count()
            if now == last:
                return now
            assert time.monotonic() < deadline, f"{model} still running {timeout_s:g} s later"
            last = now
