"""Reading avatar media: the frames of an image or a video, one at a time.

Frames are decoded as they are used (never all at once), upright (the display
rotation phone videos record is applied), cropped to even sizes (H.264's
yuv420p needs them), and refused before anything is decoded when they are
over the pixel limit; a stream whose frames change size later is refused at
that frame, before it is converted. A video longer than the duration limit is
used up to it.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import av
import cv2
import numpy as np


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


@dataclass
class Media:
    """An upload's frames, known before any is decoded: count (estimated for some videos),
    size after rotation, frame rate, and whether a long video was cut."""

    data: bytes
    is_image: bool
    width: int
    height: int
    fps: float
    frames: int  # frames that will be read (after the duration limit)
    rotation: int = 0  # degrees the display matrix turns the picture
    trimmed_from_seconds: float | None = None  # the video's length, when it was cut
    image: np.ndarray | None = None  # an image's one frame
    max_pixels: int | None = None

    def read(self) -> Iterator[np.ndarray]:
        """The frames, BGR, upright and even-sized, decoded one at a time."""
        if self.image is not None:
            yield self.image
            return
        count = 0
        with av.open(io.BytesIO(self.data)) as container:
            try:
                for frame in container.decode(video=0):
                    if count >= self.frames:
                        break
                    self._check_size(frame, count)
                    yield _even(_upright(frame.to_ndarray(format="bgr24"), self.rotation))
                    count += 1
            except av.error.InvalidDataError:
                if not count:
                    raise MediaError("cannot decode the avatar video") from None
        if not count:
            raise MediaError("the avatar video holds no frames")


    def _check_size(self, frame: av.VideoFrame, index: int) -> None:
        """The header's size was checked; a stream may still change its frames' size later."""
        check_pixels(frame.width, frame.height, self.max_pixels, f"video's frame {index}")
        width, height = (frame.height, frame.width) if self.rotation % 180 else (frame.width, frame.height)
        if (width - width % 2, height - height % 2) != (self.width, self.height):
            raise MediaError(f"the video changes size at frame {index} ({self.width}x{self.height} to "
                             f"{width}x{height}); use a video of one size")


def open_media(data: bytes, max_seconds: float, max_pixels: int | None = None) -> Media:
    """What an upload holds, checked against the limits before any frame is decoded."""
    if not data:
        raise MediaError("the avatar file is empty")
    size = image_size(data)
    if size is not None:
        check_pixels(*size, max_pixels, "image")
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # EXIF orientation applied
        if image is not None:
            image = _even(image)
            return Media(data, True, image.shape[1], image.shape[0], 25.0, 1, image=image)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError("the avatar file has no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context
            check_pixels(codec.width, codec.height, max_pixels, "video")
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            rotation = _rotation(container)
            duration = _duration(container, stream)
    except MediaError:
        raise
    except Exception as error:  # noqa: BLE001 - FFmpeg's many failure types
        raise MediaError("cannot read the avatar file as an image or a video") from error
    width, height = (codec.height, codec.width) if rotation % 180 else (codec.width, codec.height)
    trimmed = duration if duration and duration > max_seconds + 1 / fps else None
    frames = round(min(duration or max_seconds, max_seconds) * fps) or 1
    return Media(data, False, width - width % 2, height - height % 2, fps, frames, rotation, trimmed,
                 max_pixels=max_pixels)


def _rotation(container) -> int:
    """The display rotation of the first frame (counter-clockwise degrees), 0 when none."""
    try:
        first = next(container.decode(video=0))
    except (StopIteration, av.error.FFmpegError):
        return 0
    return int(round(getattr(first, "rotation", 0) or 0)) % 360


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1e6
    return None


def _upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a decoded frame as its display matrix says (PyAV gives counter-clockwise degrees)."""
    turns = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}
    return cv2.rotate(frame, turns[rotation]) if rotation in turns else frame


def _even(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    return np.ascontiguousarray(frame[: h - h % 2, : w - w % 2])
