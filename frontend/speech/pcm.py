"""Speech that arrives as raw PCM in pieces (live sessions, conversational sessions)."""
from __future__ import annotations

import numpy as np

EMPTY = np.zeros(0, np.float32)


class Pcm16:
    """16-bit little-endian mono PCM arriving in pieces of any size, as float32 in [-1, 1]
    (an odd byte at the end of a piece waits for the next one)."""

    def __init__(self):
        self._odd_byte = b""

    def __call__(self, data: bytes) -> np.ndarray:
        data = self._odd_byte + data
        whole = len(data) // 2 * 2
        self._odd_byte = data[whole:]
        return np.frombuffer(data[:whole], "<i2").astype(np.float32) / 32768.0


class Resampler:
    """Streaming resampling with soxr: pieces resampled one after another join without a seam,
    and the last call (`last=True`) flushes what the filter held back."""

    def __init__(self, rate_in: int, rate_out: int):
        import soxr

        self.stream = soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality="HQ") \
            if rate_in != rate_out else None

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self.stream is None:
            return samples
        return self.stream.resample_chunk(samples, last=last)
