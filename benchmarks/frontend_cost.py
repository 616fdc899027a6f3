"""The front end's own cost per frame: audio features, blending, encoding (no Triton).

    python -m benchmarks.frontend_cost                    # 1280x720 avatar, one core
    python -m benchmarks.frontend_cost --width 1920 --height 1080

The avatar is a real photograph (scikit-image's astronaut) on a 1280x720
canvas with its real landmarks, box and blend mask. The "generated" faces are
the avatar's own 256x256 face crop with a varying mouth region: what a trained
model returns looks like a face, and H.264's cost depends on the content
(random-weight faces are noise, the encoder's worst case). Everything runs
pinned to one core (x264 with one thread), as the budget states: at most 5 ms
per frame, so that one process can feed a GPU at 200 fps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.provenance import invocation, machine
from contract import specs
from frontend import audio
from frontend.avatars import Avatar
from frontend.blending import blend_mask
from frontend.faces import LandmarkFinder, face_box
from frontend.video import Mp4Writer

RESULTS = Path(__file__).resolve().parent / "results"
SPEECH = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "speech.flac"


def canvas_avatar(width: int, height: int) -> Avatar:
    import skimage.data

    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    side = min(width, height)
    frame = np.full((height, width, 3), 90, np.uint8)
    x0 = (width - side) // 2
    frame[:side, x0 : x0 + side] = cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA)
    landmarks = LandmarkFinder().find(frame)
    box = face_box(landmarks, frame.shape)
    zeros = np.zeros((1, 8, 32, 32), np.float32)
    return Avatar("bench", frame[None], [box], zeros, [blend_mask(landmarks, box)])


def faces_like(avatar: Avatar, n: int) -> list[np.ndarray]:
    box = avatar.boxes[0]
    crop = cv2.resize(avatar.frames[0][box.y1 : box.y2, box.x1 : box.x2], (256, 256),
                      interpolation=cv2.INTER_LANCZOS4)
    faces = []
    for i in range(n):
        face = crop.copy()
        open_mouth = int(10 + 8 * np.sin(i / 3))  # a mouth opening and closing
        cv2.ellipse(face, (128, 200), (40, open_mouth), 0, 0, 360, (40, 30, 90), -1)
        faces.append(face)
    return faces


def measure(width: int, height: int, fps: int, preset: str) -> dict:
    speech = audio.decode(SPEECH.read_bytes())
    frames = audio.frame_count(speech.seconds, fps)
    avatar = canvas_avatar(width, height)
    faces = faces_like(avatar, frames)

    started = time.perf_counter()
    mel = audio.mel_segments(speech.samples_16k)
    # The encoder runs on Triton: its output shape is all the windowing needs.
    hidden = np.zeros((len(mel), specs.AUDIO_STEPS, specs.WHISPER_LAYERS, specs.WHISPER_DIM), np.float32)
    audio.frame_windows(hidden, speech.seconds, fps)
    audio_s = time.perf_counter() - started

    avatar.compositor.i420(0)  # the avatar's own conversion happens once, at load
    writer = Mp4Writer(width, height, fps, speech.original, speech.original_rate, preset, threads=1)
    blend_s = encode_s = 0.0
    for face in faces:
        t = time.perf_counter()
        frame = avatar.compositor.compose(0, face)
        blend_s += time.perf_counter() - t
        t = time.perf_counter()
        writer.write(frame)
        encode_s += time.perf_counter() - t
    t = time.perf_counter()
    video = writer.finish()
    encode_s += time.perf_counter() - t
    per = {k: round(v / frames * 1000, 2) for k, v in
           {"audio_features": audio_s, "blending": blend_s, "encoding": encode_s}.items()}
    return {"width": width, "height": height, "fps": fps, "preset": preset, "frames": frames,
            "face_box": list(avatar.boxes[0].as_tuple()), "video_bytes": len(video),
            "ms_per_frame": per, "total_ms_per_frame": round(sum(per.values()), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.frontend_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--presets", default="veryfast,superfast,ultrafast")
    p.add_argument("--repeats", type=int, default=3, help="best of N runs")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    cv2.setNumThreads(1)
    command_line = invocation("benchmarks.frontend_cost", argv)
    rows = []
    for preset in args.presets.split(","):
        runs = [measure(args.width, args.height, args.fps, preset) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["total_ms_per_frame"])
        rows.append(best)
        print(f"{preset:10s} {json.dumps(best['ms_per_frame'])} total {best['total_ms_per_frame']} ms/frame "
              f"({best['video_bytes'] / 1e3:.0f} kB for {best['frames']} frames)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"frontend_cost_{args.width}x{args.height}.md"
    lines = [f"# Front-end cost per frame, {args.width}x{args.height} avatar, one core", "",
             f"- produced by: `{command_line}`", f"- machine: {machine()}", f"- date: {time.strftime('%Y-%m-%d')}",
             "- budget: 5 ms per frame (one process feeds a GPU at 200 fps)", "",
             "| x264 preset | audio features ms | blending ms | encoding ms | total ms/frame | video kB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['ms_per_frame']['audio_features']} | {r['ms_per_frame']['blending']} | "
              f"{r['ms_per_frame']['encoding']} | {r['total_ms_per_frame']} | {r['video_bytes'] / 1e3:.0f} |"
              for r in rows]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
