"""A live stream sent to an RTMP ingest (nginx-rtmp, SRS, a CDN or a streaming platform): FLV
with H.264 and AAC, the only codecs RTMP carries everywhere.

The connection opens at the first frame (FFmpeg's RTMP client connects on its first write), and
any error of the connection is raised by `write`: the caller opens a new stream to reconnect.
"""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from frontend.video.writers import AAC_OPTIONS, audio_frames, i420_frame

IO_TIMEOUT_US = 5_000_000  # a write the ingest does not take for this long is an error, not a hang


class RtmpWriter:
    def __init__(self, url: str, width: int, height: int, fps: int, audio_rate: int, video_kbps: int,
                 keyframe_seconds: float, preset: str = "veryfast"):
        self.rate = audio_rate
        self.container = av.open(url, mode="w", format="flv",
                                 options={"flvflags": "no_duration_filesize", "rw_timeout": str(IO_TIMEOUT_US)})
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.bit_rate = video_kbps * 1000
        # zerolatency: no look-ahead and no B-frames, each frame leaves as it is encoded; a
        # keyframe every keyframe_seconds, where a player that joins starts.
        self.video.options = {"preset": preset, "tune": "zerolatency", "g": str(max(1, round(keyframe_seconds * fps)))}
        self.audio = self.container.add_stream("aac", rate=audio_rate, layout="mono")
        self.audio.time_base = Fraction(1, audio_rate)
        self.audio.options = AAC_OPTIONS
        self.frames = 0
        self._audio_fed = 0
        self._pending = np.zeros(0, np.float32)

    def write(self, frame_i420: np.ndarray, audio: np.ndarray) -> None:
        """One frame and its audio (mono float32 at the stream's rate, exactly the frame's span)."""
        self.container.mux(self.video.encode(i420_frame(frame_i420, self.frames)))
        self.frames += 1
        self._pending = np.concatenate([self._pending, np.clip(audio, -1, 1).astype(np.float32)])
        size = self.audio.codec_context.frame_size or 1024
        whole = len(self._pending) // size * size
        samples, self._pending = self._pending[:whole], self._pending[whole:]
        for frame in audio_frames(samples, self.rate, self._audio_fed, size):
            self.container.mux(self.audio.encode(frame))
        self._audio_fed += whole

    def close(self) -> None:
        """End the stream (what is encoded is sent where the connection still takes it)."""
        try:
            self.container.mux(self.video.encode(None))
            self.container.mux(self.audio.encode(None))
        except Exception:  # noqa: BLE001 - a lost connection cannot take the last packets
            pass
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - nor its trailer
            pass
