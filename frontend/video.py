"""Reading avatar media and writing the answer's mp4, with PyAV (FFmpeg inside the wheel)."""
from __future__ import annotations

import io
from fractions import Fraction

import av
import cv2
import numpy as np

AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


class MediaError(ValueError):
    """The avatar upload is neither an image nor a video we can read."""


class MediaTooLarge(MediaError):
    """An image or video whose frames are over the pixel limit (found before decoding them)."""


def check_pixels(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLarge(f"the {what} is {width}x{height} ({width * height / 1e6:.1f} megapixels); "
                            f"the limit is {max_pixels / 1e6:.1f} megapixels")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image file's header, without decoding it; None if not an image."""
    from PIL import Image, UnidentifiedImageError

    # Pillow only reads the header here (OpenCV decodes), and the service checks its own
    # limit: Pillow's decompression-bomb check would refuse before the size is known.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def read_frames(data: bytes, max_frames: int, max_pixels: int | None = None) -> list[np.ndarray]:
    """BGR frames of an image or a video file, cropped to even sizes (H.264's yuv420p needs them).

    Frames over `max_pixels` are refused before anything is decoded."""
    if not data:
        raise MediaError("the avatar file is empty")
    size = image_size(data)
    if size is not None:
        check_pixels(*size, max_pixels, "image")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if size else None
    frames = [image] if image is not None else _decode_video(data, max_frames, max_pixels)
    if not frames:
        raise MediaError("the avatar video holds no frames")
    h, w = frames[0].shape[:2]
    return [np.ascontiguousarray(f[: h - h % 2, : w - w % 2]) for f in frames]


def _decode_video(data: bytes, max_frames: int, max_pixels: int | None) -> list[np.ndarray]:
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError("the avatar file has no video stream")
            codec = container.streams.video[0].codec_context
            check_pixels(codec.width, codec.height, max_pixels, "video")
            frames = []
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="bgr24"))
                if len(frames) > max_frames:
                    raise MediaError(f"the avatar video has more than {max_frames} frames; "
                                     "trim it (a few seconds of looping video is enough)")
            return frames
    except MediaError:
        raise
    except Exception as error:  # noqa: BLE001 - FFmpeg's many failure types
        raise MediaError("cannot read the avatar file as an image or a video") from error


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
        self.video.options = {"preset": preset, "crf": str(crf)}
        self.frames = 0
        # Every stream must exist before the first packet is written; the whole
        # track is known already, so it goes first.
        if audio is not None and len(audio):
            self._write_audio(audio, rate)

    def write(self, frame_i420: np.ndarray) -> None:
        """Encode one frame given as an OpenCV I420 buffer [height * 3/2, width] (see Compositor)."""
        frame = av.VideoFrame.from_ndarray(frame_i420, format="yuv420p")
        frame.pts = self.frames
        self.frames += 1
        self.container.mux(self.video.encode(frame))

    def finish(self) -> bytes:
        """Flush the encoder and return the mp4's bytes."""
        self.container.mux(self.video.encode(None))
        self.container.close()
        return self.buffer.getvalue()

    def _write_audio(self, audio: np.ndarray, rate: int) -> None:
        if rate not in AAC_RATES:
            import librosa

            audio = librosa.resample(audio, orig_sr=rate, target_sr=48000, res_type="soxr_hq")
            rate = 48000
        stream = self.container.add_stream("aac", rate=rate, layout="mono")
        stream.time_base = Fraction(1, rate)
        # FFmpeg's "fast" AAC coder: a quarter of the default's time for speech,
        # the same size; it keeps the front end inside its per-frame budget.
        stream.options = {"aac_coder": "fast"}
        samples = np.clip(audio, -1, 1).astype(np.float32)
        size = stream.codec_context.frame_size or 1024
        for start in range(0, len(samples), size):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + size],
                                               format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            self.container.mux(stream.encode(frame))
        self.container.mux(stream.encode(None))

    def close(self) -> None:
        """Abandon the file (on errors): release FFmpeg's resources."""
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - closing half-written output may complain
            pass
