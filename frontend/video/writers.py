"""Writing the answer's video with PyAV (FFmpeg inside the wheel).

Two writers share the encoders' settings: `Mp4Writer` makes a whole mp4 in
memory (the non-streamed answer), `FragmentedMp4Writer` hands out fragmented
MP4 as frames come (streamed answers and live sessions; frontend/video/fmp4.py).
"""
from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from frontend.video import fmp4

AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
AAC_PRIMING = 1024  # samples FFmpeg's AAC encoder emits before the first input sample


def aac_input(audio: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    """Mono float32 samples at a rate AAC supports (others are resampled to 48 kHz)."""
    if rate not in AAC_RATES:
        import librosa

        audio = librosa.resample(audio, orig_sr=rate, target_sr=48000, res_type="soxr_hq")
        rate = 48000
    return np.clip(audio, -1, 1).astype(np.float32), rate


def x264_options(preset: str, crf: int, streaming: bool) -> dict[str, str]:
    # Streaming: zerolatency, so every frame's packet leaves as it is encoded (no
    # look-ahead, no B-frames) and decode order is presentation order.
    return {"preset": preset, "crf": str(crf), **({"tune": "zerolatency"} if streaming else {})}


# FFmpeg's "fast" AAC coder: a quarter of the default's time for speech, the same
# size; it keeps the front end inside its per-frame budget.
AAC_OPTIONS = {"aac_coder": "fast"}


def i420_frame(frame_i420: np.ndarray, pts: int) -> av.VideoFrame:
    """An OpenCV I420 buffer [height * 3/2, width] (see Compositor) as an encoder input."""
    frame = av.VideoFrame.from_ndarray(frame_i420, format="yuv420p")
    frame.pts = pts
    return frame


def audio_frames(samples: np.ndarray, rate: int, first_pts: int, size: int):
    """`samples` as encoder input frames of `size` samples (the last may be shorter)."""
    for start in range(0, len(samples), size):
        frame = av.AudioFrame.from_ndarray(samples[None, start : start + size], format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = first_pts + start
        yield frame


class Mp4Writer:
    """H.264 (yuv420p) video at `fps` with the speech as AAC, written to memory.

    `preset` trades encoding time for file size; the front end's per-frame
    budget is a few milliseconds, which "veryfast" keeps at 720p.
    """

    def __init__(self, width: int, height: int, fps: int, audio: np.ndarray | None = None,
                 rate: int = 16000, preset: str = "veryfast", crf: int = 18, threads: int = 0):
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height = width, height
        self.video.pix_fmt = "yuv420p"
        self.video.codec_context.thread_count = threads
        self.video.options = x264_options(preset, crf, streaming=False)
        self.frames = 0
        # Every stream must exist before the first packet is written; the whole
        # track is known already, so it goes first.
        if audio is not None and len(audio):
            self._write_audio(*aac_input(audio, rate))

    def write(self, frame_i420: np.ndarray) -> None:
        """Encode one frame given as an OpenCV I420 buffer [height * 3/2, width] (see Compositor)."""
        self.container.mux(self.video.encode(i420_frame(frame_i420, self.frames)))
        self.frames += 1

    def flush(self) -> None:
        """Nothing to hand out before `finish` (a whole mp4 is written at the end)."""

    def finish(self) -> bytes:
        """Flush the encoder and return the mp4's bytes."""
        self.container.mux(self.video.encode(None))
        self.container.close()
        return self.buffer.getvalue()

    def _write_audio(self, samples: np.ndarray, rate: int) -> None:
        stream = self.container.add_stream("aac", rate=rate, layout="mono")
        stream.time_base = Fraction(1, rate)
        stream.options = AAC_OPTIONS
        for frame in audio_frames(samples, rate, 0, stream.codec_context.frame_size or 1024):
            self.container.mux(stream.encode(frame))
        self.container.mux(stream.encode(None))

    def close(self) -> None:
        """Abandon the file (on errors): release FFmpeg's resources."""
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - closing half-written output may complain
            pass


class FragmentedMp4Writer:
    """H.264 + AAC as fragmented MP4, handed out while it is made: the init segment
    with the first fragment, then one fragment per `flush()`, and a trailer box with
    the final status (frontend/video/fmp4.py says why the boxes are written here).

    Audio is given with `add_audio` whenever it arrives; each fragment carries the
    audio up to the video written so far (plus one AAC frame, so playback never
    waits on audio), the rest at `finish`.
    """

    def __init__(self, width: int, height: int, fps: int, audio_rate: int,
                 preset: str = "veryfast", crf: int = 18, threads: int = 0):
        self.fps, self.frames = fps, 0
        self.video = av.CodecContext.create("libx264", "w")
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.time_base, self.video.framerate = Fraction(1, fps), fps
        self.video.thread_count = threads
        self.video.options = x264_options(preset, crf, streaming=True)
        self.video.flags |= av.codec.context.Flags.global_header  # SPS/PPS once, for the avcC box
        self.video.open()
        if audio_rate not in AAC_RATES:
            raise ValueError(f"{audio_rate} Hz is not an AAC rate; resample first (aac_input)")
        self.rate = audio_rate
        self.audio = av.CodecContext.create("aac", "w")
        self.audio.sample_rate, self.audio.layout, self.audio.format = audio_rate, "mono", "flt"
        self.audio.time_base = Fraction(1, audio_rate)
        self.audio.options = AAC_OPTIONS
        self.audio.flags |= av.codec.context.Flags.global_header  # the AudioSpecificConfig
        self.audio.open()
        self.video_track, self.audio_track = fmp4.Track(fmp4.VIDEO_TRACK), fmp4.Track(fmp4.AUDIO_TRACK)
        self.timescale = 1000 * fps  # a frame lasts exactly 1000 ticks at any fps
        self._pending = np.zeros(0, np.float32)
        self._audio_fed = 0  # samples given to the AAC encoder
        self._sequence = 0
        self.codecs = fmp4.codecs(self.video.extradata)
        self.init_segment = fmp4.init_segment(width, height, self.timescale, self.video.extradata,
                                              audio_rate, self.audio.extradata, AAC_PRIMING)
        self._init_sent = False

    def add_audio(self, samples: np.ndarray) -> None:
        """Mono float32 samples at the writer's audio rate, continuing the track."""
        self._pending = np.concatenate([self._pending, np.clip(samples, -1, 1).astype(np.float32)])

    def write(self, frame_i420: np.ndarray) -> None:
        for packet in self.video.encode(i420_frame(frame_i420, self.frames)):
            self._add_video(packet)
        self.frames += 1

    def flush(self) -> bytes:
        """What is ready to send: the init segment the first time, then a fragment of
        every frame written since the last flush and its audio."""
        size = self.audio.frame_size
        wanted = round((self.frames / self.fps) * self.rate) + size - self._audio_fed
        self._encode_audio(max(0, min(wanted, len(self._pending))) // size * size)
        return self._take()

    def finish(self, status: dict) -> bytes:
        """Flush both encoders: the last fragment, then the trailer carrying `status`."""
        for packet in self.video.encode(None):
            self._add_video(packet)
        self._encode_audio(len(self._pending), final=True)
        return self._take() + fmp4.trailer(status)

    def _take(self) -> bytes:
        self._sequence += 1
        out = fmp4.fragment(self._sequence, [self.video_track, self.audio_track])
        if not self._init_sent:
            out, self._init_sent = self.init_segment + out, True
        return out

    def _add_video(self, packet: av.Packet) -> None:
        self.video_track.add(fmp4.length_prefixed(bytes(packet)), 1000, packet.is_keyframe)

    def _encode_audio(self, count: int, final: bool = False) -> None:
        samples, self._pending = self._pending[:count], self._pending[count:]
        packets = []
        for frame in audio_frames(samples, self.rate, self._audio_fed, self.audio.frame_size):
            packets += self.audio.encode(frame)
        self._audio_fed += len(samples)
        if final:
            packets += self.audio.encode(None)
        for packet in packets:
            self.audio_track.add(bytes(packet), packet.duration or self.audio.frame_size)

    def close(self) -> None:
        """Abandon the stream (on errors and disconnects): release the encoders."""
        for context in (self.video, self.audio):
            try:
                context.close()
            except Exception:  # noqa: BLE001 - closing a half-used encoder may complain
                pass
