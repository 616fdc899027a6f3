"""What WebRTC viewers receive: video and audio encoded by us, once, then sent as packets.

aiortc, given an `av.Packet` by a track instead of a frame, sends it without
encoding it again (its encoders' `pack`). So a conversational session encodes
each frame once per video codec its viewers use, however many viewers watch,
and an avatar's idle cycle is encoded once for every session that shows it
(frontend/sessions/idle.py): an idle session sends packets and encodes nothing
but 20 ms of silence now and then.

- Video: H.264 constrained baseline (what WebRTC's H.264 profile 42e01f asks for:
  no B-frames, CAVLC), SPS/PPS repeated with every keyframe so a viewer can start
  at any keyframe; VP8 for offers without H.264. Keyframes come on request (a
  viewer joining, a picture-loss report, the switch from replayed idle packets to
  live encoding) and every `keyframe_interval` frames.
- Audio: Opus, mono, 48 kHz, 20 ms packets, stamped with their sample index on
  the session's clock.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import av
import numpy as np

from frontend.video.writers import i420_frame

VIDEO_CODECS = ("H264", "VP8")
AUDIO_RATE = 48000
OPUS_SAMPLES = 960  # 20 ms at 48 kHz


@dataclass(frozen=True)
class EncodedFrame:
    data: bytes
    keyframe: bool


class VideoEncoder:
    """I420 frames in, one packet's bytes per frame out."""

    def __init__(self, codec: str, width: int, height: int, fps: int, kbps: int, keyframe_interval: int):
        if codec not in VIDEO_CODECS:
            raise ValueError(f"video codec must be one of {VIDEO_CODECS}, not {codec!r}")
        self.codec = codec
        self.context = av.CodecContext.create("libx264" if codec == "H264" else "libvpx", "w")
        self.context.width, self.context.height, self.context.pix_fmt = width, height, "yuv420p"
        self.context.time_base, self.context.framerate = Fraction(1, fps), fps
        self.context.bit_rate = kbps * 1000
        if codec == "H264":
            # zerolatency: each frame's packet leaves as it is encoded (no look-ahead).
            self.context.options = {
                "preset": "veryfast", "tune": "zerolatency", "profile": "baseline", "forced-idr": "1",
                "x264-params": f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0:"
                               f"repeat-headers=1:vbv-maxrate={kbps}:vbv-bufsize={kbps}"}
        else:  # libvpx's real-time mode, as browsers use it
            self.context.gop_size = keyframe_interval
            self.context.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                                    "static-thresh": "1", "maxrate": str(kbps * 1000), "bufsize": str(kbps * 1000)}
        self.frames = 0

    def encode(self, frame_i420: np.ndarray, keyframe: bool = False) -> EncodedFrame:
        frame = i420_frame(frame_i420, self.frames)
        frame.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        self.frames += 1
        packets = self.context.encode(frame)
        return EncodedFrame(b"".join(bytes(p) for p in packets), any(p.is_keyframe for p in packets))

    def close(self) -> None:
        self.context = None  # PyAV frees an encoder with its last reference


class OpusEncoder:
    """Mono float32 samples at 48 kHz in, 20 ms Opus packets out as (first sample's index, bytes):
    the index is the packet's place on the session's clock (its RTP timestamp, less an offset).

    Silence costs next to nothing, as with Opus's own DTX: after SILENT_BLOCKS blocks of digital
    silence, one pre-encoded silent packet goes every DTX_EVERY blocks (400 ms) and nothing in
    between (players fill the gaps with silence), so an idle session encodes no audio and sends
    a twentieth of the packets; the next sound starts a fresh encoder (the decoder has heard only
    silence: Opus starts cleanly on either side)."""

    SILENT_BLOCKS = 10
    DTX_EVERY = 20

    def __init__(self, kbps: int = 48):
        self.kbps = kbps
        self.context = opus_context(kbps)
        self.pending = np.zeros(0, np.float32)
        self.position = 0  # sample index of pending[0]
        self.silent_run = 0
        self.silence = silence_packet(kbps)

    def add(self, samples: np.ndarray, start: int) -> list[tuple[int, bytes]]:
        """`samples` beginning at sample `start` of the clock; a gap (nobody listened) starts afresh."""
        if start != self.position + len(self.pending):
            self.pending, self.position = np.zeros(0, np.float32), start
        self.pending = np.concatenate([self.pending, samples.astype(np.float32)])
        out = []
        while len(self.pending) >= OPUS_SAMPLES:
            block, self.pending = self.pending[:OPUS_SAMPLES], self.pending[OPUS_SAMPLES:]
            self.silent_run = self.silent_run + 1 if not block.any() else 0
            if self.silent_run > self.SILENT_BLOCKS:
                if self.silent_run % self.DTX_EVERY == 0:
                    out.append((self.position, self.silence))
            else:
                if self.silent_run == 0 and self.context is None:
                    self.context = opus_context(self.kbps)
                data = opus_packet(self.context, block, self.position) if self.context else self.silence
                out.append((self.position, data))
                if self.silent_run == self.SILENT_BLOCKS:
                    self.close()  # silence from here on: the next sound gets a fresh encoder
            self.position += OPUS_SAMPLES
        return out

    def close(self) -> None:
        self.context = None  # PyAV frees an encoder with its last reference


def opus_context(kbps: int):
    context = av.CodecContext.create("libopus", "w")
    context.sample_rate, context.layout, context.format = AUDIO_RATE, "mono", "flt"
    context.time_base = Fraction(1, AUDIO_RATE)
    context.bit_rate = kbps * 1000
    context.options = {"application": "voip"}
    return context


def opus_packet(context, block: np.ndarray, pts: int) -> bytes:
    frame = av.AudioFrame.from_ndarray(np.clip(block, -1, 1)[None], format="flt", layout="mono")
    frame.sample_rate, frame.pts = AUDIO_RATE, pts
    return b"".join(bytes(p) for p in context.encode(frame))


@lru_cache(maxsize=4)
def silence_packet(kbps: int) -> bytes:
    """What the encoder settles on for digital silence (its first packets carry start-up state)."""
    context = opus_context(kbps)
    zeros = np.zeros(OPUS_SAMPLES, np.float32)
    return [opus_packet(context, zeros, k * OPUS_SAMPLES) for k in range(5)][-1]
