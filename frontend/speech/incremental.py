"""Per-frame audio windows from speech that is still arriving.

The whole-clip path (frontend/speech/audio.py) runs whisper's encoder once per 30 s
segment on the finished audio. Live, the audio of a segment grows while we
listen, so the encoder runs again on the segment as it grows:

- **Where the window starts.** Always at the segment's start, as the whole-clip
  path cuts segments (every 30 s of the stream). Each encoder call costs the
  same whatever its length (it always sees a padded 30 s segment: about 100 ms
  on 2 CPU cores, a few ms on a GPU), so using the whole segment so far costs
  nothing more than a short window, and every step keeps the position, the
  left context and the segment's log-mel range the whole-clip path gives it.
  Memory is bounded: one segment of samples, and the steps the next frames need.
- **Look-ahead.** A step near the end of the audio received so far has not yet
  heard what follows it (the whole-clip path has). Steps are kept ("final")
  only once `lookahead` seconds of audio exist after them; a frame is released
  when every step of its window is final. 40 ms covers what each step sees
  directly (the STFT window and the two convolutions: about +-35 ms); beyond it
  only attention hears the future, and waiting longer barely helps (with the
  tiny synthetic encoder the windows' distance to the whole-clip path's goes from
  1.20% at 0 ms to 1.13% at 40 ms and 1.07% at 480 ms). Frame i's window itself reaches 2 frames
  past the frame (upstream's windowing), so at 25 fps frame i leaves once the
  audio up to (i + 3) / 25 s + 40 ms has arrived, and a run has encoded it.
- **How often the encoder runs.** At most every `hop` (80 ms) of new audio, when
  the run would release at least one frame and generation is about to run out
  of frames: a generator that keeps up gets a run every hop; a slow one (a CPU
  with the full models) gets fewer, each releasing more frames, so the encoder
  never takes the compute the frames need. A completed segment and the end of
  the stream always run once more; from then on the steps are exactly the
  whole-clip path's. Each run moves the encoder's whole output (11.5 MB) from
  Triton: at 12 runs a second that is about 140 MB/s per session on the wire.

`benchmarks/live_features.py` measures how far the windows are from the
whole-clip path's for several look-aheads.
"""
from __future__ import annotations

import math

import numpy as np

from contract import specs
from frontend.speech import audio

SEGMENT = audio.SEGMENT_SAMPLES
STEP = specs.SAMPLE_RATE // specs.AUDIO_STEPS_PER_SECOND  # 320 samples per encoder step
LOOKAHEAD_S = 0.04
HOP_S = 0.08


class IncrementalFeatures:
    """Feed 16 kHz samples with `add`, run `run_input()` through the audio_encoder when
    `due()`, give the result to `accept`, and take the released windows with `windows()`."""

    def __init__(self, fps: int, lookahead_s: float = LOOKAHEAD_S, hop_s: float = HOP_S):
        self.fps = fps
        self.lookahead = round(lookahead_s * specs.SAMPLE_RATE)
        self.hop = round(hop_s * specs.SAMPLE_RATE)
        multiplier = specs.AUDIO_STEPS_PER_SECOND / fps
        self.multiplier = multiplier
        self.left = math.ceil(multiplier) * audio.PAD_LEFT  # zero steps before the first one
        self.segment = 0  # index of the segment being heard
        self.buffer = np.zeros(0, np.float32)  # samples from the segment's start on
        self.received = 0  # samples of the whole stream
        self.ended = False
        self.final = np.zeros((0, specs.WHISPER_LAYERS, specs.WHISPER_DIM), np.float32)
        self.final_start = 0  # absolute step index of final[0]
        self.final_steps = 0  # absolute steps known for good
        self.released = 0  # frames handed out
        self.mel = audio.GrowingLogMel()  # of the segment being heard
        self.runs = 0
        self._last_run = 0  # `received` when the last run was prepared

    # -- input ----------------------------------------------------------------------------
    def add(self, samples_16k: np.ndarray) -> None:
        if self.ended:
            raise RuntimeError("the stream has ended")
        self.buffer = np.concatenate([self.buffer, samples_16k.astype(np.float32)])
        self.received += len(samples_16k)

    def end(self) -> None:
        self.ended = True

    @property
    def seconds(self) -> float:
        return self.received / specs.SAMPLE_RATE

    @property
    def total_frames(self) -> int | None:
        """floor(seconds x fps) once the stream has ended."""
        return audio.frame_count(self.seconds, self.fps) if self.ended else None

    # -- the encoder ----------------------------------------------------------------------
    def due(self) -> bool:
        """Whether an encoder run now would finalise steps that frames are waiting for."""
        if len(self.buffer) >= SEGMENT:
            return True  # a segment is complete
        total_steps = self._segment_steps() + self.segment * specs.AUDIO_STEPS
        if self.ended:
            return self.final_steps < total_steps
        if self.received - self._last_run < self.hop:
            return False
        return self._provisional_final() >= self._needed(self.released)

    def run_input(self) -> tuple[tuple[int, int], np.ndarray]:
        """(what the run covers, the log-mel [1, 80, 3000] to encode)."""
        count = min(len(self.buffer), SEGMENT)
        self._last_run = self.received
        self.runs += 1
        return (self.segment, count), self.mel(self.buffer[:count])[None]

    def accept(self, covers: tuple[int, int], hidden: np.ndarray) -> None:
        """Keep the steps of an encoder run (hidden: [1, 1500, 5, 384] or [1500, 5, 384])
        that are final now."""
        segment, count = covers
        if segment != self.segment:
            return  # a run of an earlier segment, already superseded
        hidden = hidden.reshape(-1, specs.WHISPER_LAYERS, specs.WHISPER_DIM)
        valid = count // STEP
        complete = count == SEGMENT or (self.ended and count == len(self.buffer))
        keep = valid if complete else max(0, math.floor((count - self.lookahead) / STEP))
        offset = segment * specs.AUDIO_STEPS
        new = hidden[max(0, self.final_steps - offset) : keep]
        if len(new):
            self.final = np.concatenate([self.final, new])
            self.final_steps = offset + keep
        if count == SEGMENT:  # on to the next segment
            self.buffer = self.buffer[SEGMENT:]
            self.segment += 1
            self.mel = audio.GrowingLogMel()

    # -- output ---------------------------------------------------------------------------
    def windows(self) -> tuple[int, np.ndarray]:
        """(index of the first, windows [k, 50, 384]) of every frame releasable now."""
        first = self.released
        stop = first
        limit = self.total_frames if self.ended and self.final_steps >= self._all_steps() else None
        while (limit is not None and stop < limit) or (limit is None and self._needed(stop) <= self.final_steps):
            stop += 1
        windows = np.stack([self._window(i) for i in range(first, stop)]) if stop > first else \
            np.zeros((0, specs.CHUNK_TOKENS, specs.WHISPER_DIM), np.float32)
        self.released = stop
        self._forget_before(self._start(stop) - self.left)
        return first, windows

    @property
    def done(self) -> bool:
        return self.ended and self.final_steps >= self._all_steps() and self.released >= self.total_frames

    # -- steps and frames -----------------------------------------------------------------
    def _start(self, frame: int) -> int:
        return math.floor(frame * self.multiplier)

    def _needed(self, frame: int) -> int:
        """Steps that must be final before `frame` is released."""
        return self._start(frame) - self.left + specs.CHUNK_STEPS

    def _window(self, frame: int) -> np.ndarray:
        first = self._start(frame) - self.left
        out = np.zeros((specs.CHUNK_STEPS, specs.WHISPER_LAYERS, specs.WHISPER_DIM), np.float32)
        for k in range(specs.CHUNK_STEPS):
            step = first + k
            if self.final_start <= step < self.final_steps and step < self._all_steps():
                out[k] = self.final[step - self.final_start]
        return out.reshape(specs.CHUNK_TOKENS, specs.WHISPER_DIM)

    def _segment_steps(self) -> int:
        return math.floor(min(len(self.buffer), SEGMENT) / STEP)

    def _all_steps(self) -> int:
        """Steps of the whole stream (whole-clip: floor(seconds * 50)); meaningful once ended."""
        return math.floor(self.received / STEP) if self.ended else self.final_steps

    def _provisional_final(self) -> int:
        count = min(len(self.buffer), SEGMENT)
        return self.segment * specs.AUDIO_STEPS + max(0, math.floor((count - self.lookahead) / STEP))

    def _forget_before(self, step: int) -> None:
        drop = min(max(0, step - self.final_start), len(self.final))
        if drop:
            self.final = self.final[drop:]
            self.final_start += drop
