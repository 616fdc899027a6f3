"""How far are live (incremental) audio windows from the whole-clip path's, and what do they cost?

    python -m benchmarks.live_features                       # the full-size synthetic encoder
    python -m benchmarks.live_features --repository build/test/tiny_onnx --label tiny

The same speech goes through both paths with the same ONNX audio_encoder (onnxruntime):
the whole clip at once (frontend/speech/audio.py), and live in 40 ms chunks
(frontend/speech/incremental.py) for several look-aheads. For each: the relative L2
distance of all frames' windows, the worst frame's, the encoder runs, and the
audio each frame waits for beyond its own end (upstream's 2 frames + the
look-ahead + up to one hop). Random weights: the distances are those of this
encoder, not whisper's (whose attention is more local); they show the trend.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.provenance import invocation, machine, publish
from contract.layout import model_path
from contract.runners import open_runner
from frontend.speech import audio
from frontend.speech.incremental import HOP_S, IncrementalFeatures
from stack.samples import SPEECH

RESULTS = Path(__file__).resolve().parent / "results"


def whole_clip(encoder, speech: audio.Speech, fps: int) -> np.ndarray:
    hidden = encoder({"input_features": audio.mel_segments(speech.samples_16k)})["hidden_states"]
    return audio.frame_windows(hidden, speech.seconds, fps)


def live(encoder, samples: np.ndarray, fps: int, lookahead: float, hop: float, chunk: float = 0.04):
    features = IncrementalFeatures(fps, lookahead, hop)
    step = round(chunk * 16000)
    out = []

    def pump():
        while features.due():
            covers, mel = features.run_input()
            features.accept(covers, encoder({"input_features": mel})["hidden_states"])
            first, windows = features.windows()
            out.append(windows)

    for start in range(0, len(samples), step):
        features.add(samples[start : start + step])
        pump()
    features.end()
    pump()
    out.append(features.windows()[1])
    assert features.done
    return np.concatenate(out), features.runs


def distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    per_frame = np.linalg.norm((a - b).reshape(len(a), -1), axis=1) / np.maximum(
        np.linalg.norm(b.reshape(len(b), -1), axis=1), 1e-12)
    total = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    return total, float(per_frame.max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.live_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--label", default="full")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--lookaheads", default="0,0.04,0.12,0.48")
    p.add_argument("--repeat", type=int, default=6, help="the speech repeated this many times (longer streams)")
    args = p.parse_args(argv)
    encoder = open_runner(model_path(args.repository, "audio_encoder"))
    speech = audio.decode(SPEECH.read_bytes())
    samples = np.concatenate([speech.samples_16k] * args.repeat)  # about 33 s: crosses a segment boundary
    long = audio.Speech(samples, samples, 16000)
    reference = whole_clip(encoder, long, args.fps)
    started = time.perf_counter()
    encoder({"input_features": audio.mel_segments(samples[:16000])})
    run_ms = (time.perf_counter() - started) * 1000
    rows = []
    for lookahead in map(float, args.lookaheads.split(",")):
        windows, runs = live(encoder, samples, args.fps, lookahead, HOP_S)
        assert windows.shape == reference.shape
        total, worst = distance(windows, reference)
        waits = 2 / args.fps + lookahead
        rows.append({"lookahead_ms": round(lookahead * 1000), "rel_l2": float(f"{total:.3g}"),
                     "worst_frame_rel_l2": float(f"{worst:.3g}"), "encoder_runs": runs,
                     "runs_per_second": round(runs / long.seconds, 2),
                     "audio_waited_ms": f"{waits * 1000:.0f} to {(waits + HOP_S) * 1000:.0f}"})
        print(rows[-1], flush=True)
    out = RESULTS / f"live_features_{args.label}.md"
    lines = [f"# Live audio windows against the whole-clip path ({args.label} synthetic encoder)", "",
             f"- produced by: `{invocation('benchmarks.live_features', argv)}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d')}",
             f"- speech: the test fixture repeated {args.repeat}x ({long.seconds:.1f} s, crosses a 30 s segment), "
             f"fed in 40 ms chunks, {args.fps} fps, hop {HOP_S * 1000:.0f} ms",
             f"- one audio_encoder call: {run_ms:.0f} ms (onnxruntime, this CPU)",
             "- random weights: the distances are this encoder's, not whisper's", "",
             "| look-ahead ms | rel-L2, all frames | worst frame rel-L2 | encoder runs | runs/s "
             "| audio a frame waits for (ms) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['lookahead_ms']} | {r['rel_l2']} | {r['worst_frame_rel_l2']} | {r['encoder_runs']} | "
              f"{r['runs_per_second']} | {r['audio_waited_ms']} |" for r in rows]
    print(f"results: {publish(out, lines, {'rows': rows, 'encoder_ms': run_ms})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
