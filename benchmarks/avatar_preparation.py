"""Avatars from real footage: preparation speed per stage, disk, memory, and fidelity.

    python -m benchmarks.avatar_preparation                       # tiny models, 10 s clips at 720p and 1080p
    python -m benchmarks.avatar_preparation --profile full --seconds 4

For each resolution, a 10 s clip of the astronaut's face (swaying and growing
a little, as a speaker does) is made, prepared by a front-end process of its own
through POST /avatars (its vae_encoder on the local Triton), and measured:
- seconds per stage (decode, face detection, landmarks, crop + mask, frames
  written as H.264, waiting for vae_encoder, save), from the avatar's meta;
- the avatar's size on disk, against the raw frames the earlier format stored;
- the front end's resident memory: before, after preparing, after one generation;
- the composed frames against composing from the upload's raw decoded frames
  (what the earlier format stored), PSNR over the whole frame, every 10th frame.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import psutil

from benchmarks.provenance import invocation, machine, publish
from stack.samples import SPEECH

RESULTS = Path(__file__).resolve().parent / "results"


def clip(width: int, height: int, seconds: float, fps: int = 25) -> list[np.ndarray]:
    import skimage.data

    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    frames = []
    for i in range(round(seconds * fps)):
        side = round(height * (0.9 + 0.05 * np.sin(i / 40)))  # leaning in and out
        portrait = cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA)
        frame = np.full((height, width, 3), 70, np.uint8)
        x0 = (width - side) // 2 + round(30 * np.sin(i / 25))  # swaying
        y0 = height - side
        frame[y0:, max(0, x0) : x0 + side] = portrait[:, max(0, -x0) : side - max(0, x0 + side - width)]
        frames.append(frame)
    return frames


def encode(frames: list[np.ndarray], fps: int = 25) -> bytes:
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "16", "preset": "veryfast"}
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="bgr24")
            picture.pts = i
            out.mux(stream.encode(picture))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def fidelity(folder: Path, frames: list[np.ndarray]) -> float:
    """Lowest PSNR of composing from the stored H.264 frames against composing from the raw
    frames (the earlier format), with the same generated face (a mid-grey face with a mouth)."""
    from export.precision import face_psnr
    from frontend.avatars.store import load_folder

    avatar = load_folder("bench", folder)
    reader = avatar.reader()
    face = np.full((256, 256, 3), 128, np.uint8)
    cv2.ellipse(face, (128, 200), (40, 14), 0, 0, 360, (40, 30, 90), -1)
    worst = 99.0
    for source in range(0, avatar.frame_count, 10):
        earlier = avatar.compositor.compose(source, cv2.cvtColor(frames[source], cv2.COLOR_BGR2YUV_I420), face)
        now = avatar.compositor.compose(source, reader.frame(source), face)
        worst = min(worst, face_psnr(earlier, now))
    reader.close()
    return worst


def decoded(video: bytes) -> list[np.ndarray]:
    """The upload's frames as the earlier format stored them (raw, after decoding)."""
    from frontend.avatars.media import open_media

    return list(open_media(video, max_seconds=3600).read())


def measure(url: str, process: psutil.Process, store: Path, width: int, height: int, seconds: float) -> dict:
    video = encode(clip(width, height, seconds))
    frames = decoded(video)
    avatar_id = f"bench{width}x{height}"
    before = process.memory_info().rss
    started = time.perf_counter()
    answer = httpx.post(f"{url}/avatars", data={"avatar_id": avatar_id},
                        files={"file": ("clip.mp4", video)}, timeout=3600)
    while answer.status_code == 202 or answer.json().get("status") in ("queued", "preparing"):
        time.sleep(0.5)
        answer = httpx.get(f"{url}/avatars/{avatar_id}")
    meta = answer.json()
    assert meta["status"] == "ready", meta
    wall = time.perf_counter() - started
    prepared = process.memory_info().rss
    generated = httpx.post(f"{url}/onnx-infer", data={"avatar_id": avatar_id},
                           files={"audio_file": ("speech.flac", SPEECH.read_bytes())}, timeout=3600)
    generated.raise_for_status()
    after = process.memory_info().rss
    folder = store / avatar_id
    disk = sum(f.stat().st_size for f in folder.iterdir())
    raw = len(frames) * width * height * 3
    return {"resolution": f"{width}x{height}", "frames": meta["frames"], "seconds_of_video": seconds,
            "prepare_wall_s": round(wall, 1), "stages_s": meta["stage_seconds"],
            "ms_per_frame": round(1000 * wall / meta["frames"], 1),
            "disk_mb": round(disk / 1e6, 1), "raw_frames_mb": round(raw / 1e6, 1),
            "rss_before_mb": round(before / 1e6), "rss_prepared_mb": round(prepared / 1e6),
            "rss_after_generation_mb": round(after / 1e6), "min_psnr_db": round(fidelity(folder, frames), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.avatar_preparation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["tiny", "full"], default="tiny")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--resolutions", default="1280x720,1920x1080")
    args = p.parse_args(argv)

    from stack.exports import ensure_exported
    from stack.frontend_process import FrontEnd
    from triton_local.launch import start
    from triton_local.processes import free_port
    from triton_local.server import BUILD, Ports

    server = start(ensure_exported(args.profile), Ports.free(), target=BUILD / "bench_triton", progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        frontend = FrontEnd(server.grpc_url, free_port(), host="127.0.0.1", log_file=BUILD / "bench_frontend.log",
                            env={"MUSETALK_AVATAR_DIR": str(store), "MUSETALK_PREPARE_WAIT_SECONDS": "0"}).start()
        try:
            process = psutil.Process(frontend.process.pid)
            httpx.get(f"{frontend.url}/avatars")  # the process has served once
            for resolution in args.resolutions.split(","):
                width, height = map(int, resolution.split("x"))
                rows.append(measure(frontend.url, process, store, width, height, args.seconds))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            frontend.stop()
            server.stop()
    write(args, rows)
    return 0


def write(args, rows: list[dict]) -> None:
    out = RESULTS / f"avatar_preparation_{args.profile}_cpu.md"
    stages = list(rows[0]["stages_s"])
    lines = [f"# Avatar preparation ({args.profile} profile)", "",
             f"- produced by: `{invocation('benchmarks.avatar_preparation', None)}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d')}",
             f"- a {args.seconds:g} s clip at 25 fps, prepared through POST /avatars by a front-end process",
             "- random weights: real timings, no lip sync", "",
             "## Speed per stage (seconds for the whole clip)", "",
             "| clip | frames | " + " | ".join(stages) + " | wall | ms per frame |",
             "|---" * (len(stages) + 4) + "|"]
    lines += [f"| {r['resolution']} | {r['frames']} | " + " | ".join(str(r["stages_s"][s]) for s in stages)
              + f" | {r['prepare_wall_s']} | {r['ms_per_frame']} |" for r in rows]
    lines += ["", "## Disk, memory and fidelity", "",
              "| clip | on disk MB | raw frames MB | front-end RSS MB: before / prepared / after a generation "
              "| lowest PSNR vs raw-frame composition dB |", "|---|---|---|---|---|"]
    lines += [f"| {r['resolution']} | {r['disk_mb']} | {r['raw_frames_mb']} | {r['rss_before_mb']} / "
              f"{r['rss_prepared_mb']} / {r['rss_after_generation_mb']} | {r['min_psnr_db']} |" for r in rows]
    print(f"results: {publish(out, lines, rows)}")


if __name__ == "__main__":
    raise SystemExit(main())
