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
        try:
            self.context.close()
        except Exception:  # noqa: BLE001 - closing a half-used encoder may complain
            pass


class OpusEncoder:
    """Mono float32 samples at 48 kHz in, 20 ms Opus packets out as (first sample's index, bytes):
    the index is the packet's place on the session's clock (its RTP timestamp, less an offset)."""

    def __init__(self, kbps: int = 48):
        self.context = av.CodecContext.create("libopus", "w")
        self.context.sample_rate, self.context.layout, self.context.format = AUDIO_RATE, "mono", "flt"
        self.context.time_base = Fraction(1, AUDIO_RATE)
        self.context.bit_rate = kbps * 1000
        self.context.options = {"application": "voip"}
        self.pending = np.zeros(0, np.float32)
        self.position = 0  # sample index of pending[0]

    def add(self, samples: np.ndarray) -> list[tuple[int, bytes]]:
        self.pending = np.concatenate([self.pending, samples.astype(np.float32)])
        out = []
        while len(self.pending) >= OPUS_SAMPLES:
            block, self.pending = self.pending[:OPUS_SAMPLES], self.pending[OPUS_SAMPLES:]
            frame = av.AudioFrame.from_ndarray(np.clip(block, -1, 1)[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts = AUDIO_RATE, self.position
            data = b"".join(bytes(p) for p in self.context.encode(frame))
            if data:
                out.append((self.position, data))
            self.position += OPUS_SAMPLES
        return out

    def close(self) -> None:
        try:
            self.context.close()
        except Exception:  # noqa: BLE001
            pass
