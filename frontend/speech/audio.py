"""Speech to per-frame audio windows: upstream MuseTalk's AudioProcessor, in numpy.

decode -> 16 kHz mono -> 30 s segments -> whisper log-mel [80, 3000] each
-> (Triton audio_encoder) -> [steps, 5, 384] -> one [50, 384] window per video frame.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from contract import specs

SEGMENT_SAMPLES = 30 * specs.SAMPLE_RATE
N_FFT = 400
HOP = 160
# Upstream's audio_padding_length_left / _right (both 2): the window of 10 steps
# (2 * (2 + 2 + 1)) starts 2 frames' worth of steps before the frame.
PAD_LEFT = 2
PAD_RIGHT = 2


class AudioError(ValueError):
    """The upload is not audio we can use; the message says why."""


@dataclass
class Speech:
    """Decoded speech: the 16 kHz mono samples features are made from, and the
    original samples (mono, native rate) that go into the video's audio track."""

    samples_16k: np.ndarray
    original: np.ndarray
    original_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples_16k) / specs.SAMPLE_RATE


def decode(data: bytes, max_seconds: float | None = None) -> Speech:
    """Decode any audio file's bytes (wav, flac, ogg, mp3, and what FFmpeg reads).

    Matches `librosa.load(path, sr=16000)`: float32, channels averaged, soxr_hq
    resampling. The length is checked before decoding where the file declares it
    (a few kB of FLAC can hold an hour of silence), and decoding stops at the
    limit where it does not; channels are averaged block by block, so memory is
    one mono track of at most `max_seconds`, whatever the file.
    """
    import librosa

    if not data:
        raise AudioError("the audio file is empty")
    mono, rate = _read(data, max_seconds)
    if mono.size == 0:
        raise AudioError("the audio file holds no samples")
    resampled = librosa.resample(mono, orig_sr=rate, target_sr=specs.SAMPLE_RATE, res_type="soxr_hq")
    return Speech(np.ascontiguousarray(resampled, dtype=np.float32), mono, rate)


def too_long(seconds: float, max_seconds: float) -> AudioError:
    return AudioError(f"the audio lasts {seconds:.1f} s; the limit is {max_seconds:g} s")


def _read(data: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(mono float32 samples, rate), via libsndfile, else FFmpeg."""
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
        if max_seconds is not None and info.frames / info.samplerate > max_seconds:
            raise too_long(info.frames / info.samplerate, max_seconds)
        blocks = soundfile.blocks(io.BytesIO(data), blocksize=65536, dtype="float32", always_2d=True)
        parts = [block.mean(axis=1) if block.shape[1] > 1 else block[:, 0] for block in blocks]
        return (np.concatenate(parts) if parts else np.zeros(0, np.float32)).astype(np.float32), info.samplerate
    except AudioError:
        raise
    except Exception:  # noqa: BLE001 - libsndfile cannot read this (or all of it): FFmpeg can
        pass
    try:
        return _read_with_ffmpeg(data, max_seconds)
    except AudioError:
        raise
    except Exception as error:  # noqa: BLE001
        raise AudioError(
            "cannot decode the audio file (expected wav, mp3, flac, ogg or another audio format)"
        ) from error


def _read_with_ffmpeg(data: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        stream = container.streams.audio[0]
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else \
            (container.duration / 1e6 if container.duration else None)
        if max_seconds is not None and declared is not None and declared > max_seconds + 0.5:
            raise too_long(declared, max_seconds)
        limit = None if max_seconds is None else int((max_seconds + 0.5) * stream.rate)
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=stream.rate)
        chunks, count = [], 0
        try:
            for frame in container.decode(stream):
                for mono in resampler.resample(frame):
                    chunks.append(mono.to_ndarray()[0])
                    count += len(chunks[-1])
                if limit is not None and count > limit:  # a stream that did not say how long it is
                    raise too_long(count / stream.rate, max_seconds)
        except av.error.InvalidDataError:
            if not chunks:
                raise
            # A file cut short (an interrupted recording): keep what was whole, as players do.
    if not chunks:
        raise AudioError("the audio stream holds no samples")
    return np.concatenate(chunks).astype(np.float32), stream.rate


@lru_cache(maxsize=1)
def _mel_filters() -> np.ndarray:
    import librosa

    # Slaney-style, as whisper's own mel_filters.npz and transformers' extractor.
    return librosa.filters.mel(sr=specs.SAMPLE_RATE, n_fft=N_FFT, n_mels=specs.MEL_BINS,
                               fmin=0.0, fmax=8000.0, htk=False, norm="slaney").astype(np.float64)


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    n = np.arange(N_FFT)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)  # periodic, like torch.hann_window


COLUMNS = SEGMENT_SAMPLES // HOP + 1  # the centred STFT's frames of 30 s (the last one is dropped)


def log_mel(segment: np.ndarray) -> np.ndarray:
    """Whisper's log-mel of up to 30 s of 16 kHz audio: [80, 3000] float32.

    The maths of transformers' WhisperFeatureExtractor: zero-pad to 30 s,
    centred STFT (n_fft 400, hop 160, reflect padding), power, slaney mel,
    log10, clamp to max-8, (x + 4) / 4.
    """
    return GrowingLogMel()(segment)


class GrowingLogMel:
    """`log_mel` of a segment that grows (live speech): each call computes again only the
    STFT columns the new samples reach, so a call costs about 6 ms instead of 36 ms; the
    result is bit for bit log_mel's. One per segment; calls must see a growing prefix."""

    def __init__(self):
        self.mel = np.zeros((specs.MEL_BINS, COLUMNS))
        self.final = 0  # columns that will not change any more

    def __call__(self, segment: np.ndarray) -> np.ndarray:
        n = min(len(segment), SEGMENT_SAMPLES)
        audio = np.zeros(SEGMENT_SAMPLES, dtype=np.float64)
        audio[:n] = segment[:n]
        padded = np.pad(audio, N_FFT // 2, mode="reflect")
        # Columns past `last` see only the zero padding: their mel power stays 0.
        last = COLUMNS if n == SEGMENT_SAMPLES else min(COLUMNS, (n + N_FFT // 2 - 1) // HOP + 1)
        frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][self.final : last]
        power = np.abs(np.fft.rfft(frames * _hann(), axis=-1)) ** 2
        self.mel[:, self.final : last] = _mel_filters() @ power.T
        if n > N_FFT // 2:  # a column is final once its window lies in the samples given
            self.final = max(self.final, min(last, (n - N_FFT // 2) // HOP + 1))
        log = np.log10(np.maximum(self.mel, 1e-10))[:, :-1]
        log = np.maximum(log, log.max() - 8.0)
        return ((log + 4.0) / 4.0).astype(np.float32)


def mel_segments(samples_16k: np.ndarray) -> np.ndarray:
    """Upstream splits the audio in 30 s segments, one log-mel each: [S, 80, 3000]."""
    starts = range(0, max(len(samples_16k), 1), SEGMENT_SAMPLES)
    return np.stack([log_mel(samples_16k[s : s + SEGMENT_SAMPLES]) for s in starts])


def frame_count(seconds: float, fps: int) -> int:
    """Video frames for `seconds` of audio: floor(seconds * fps). None is dropped."""
    return math.floor(seconds * fps)


class FrameWindows:
    """Per-frame audio windows [frames, 50, 384] from the encoder's [S, 1500, 5, 384], made
    only for the frames asked for (`windows[start:stop]`): every frame's window at once
    would cost 550 MB for 120 s at 60 fps.

    Upstream's get_whisper_chunk: trim to floor(seconds * 50) steps, zero-pad by
    ceil(50/fps) * 2 steps on the left and ceil(50/fps) * 3 * 2 on the right,
    then frame i takes 10 steps from floor(i * 50/fps), time-major then layer.
    """

    def __init__(self, hidden_states: np.ndarray, seconds: float, fps: int):
        steps = hidden_states.reshape(-1, specs.WHISPER_LAYERS, specs.WHISPER_DIM)
        self.steps = steps[: math.floor(seconds * specs.AUDIO_STEPS_PER_SECOND)]
        self.multiplier = specs.AUDIO_STEPS_PER_SECOND / fps
        self.count = frame_count(seconds, fps)
        self.left = math.ceil(self.multiplier) * PAD_LEFT

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, frames: slice) -> np.ndarray:
        # Upstream's right padding runs short above 50 fps (it exits there); the zeros past
        # the end here reach as far as the last window needs, which changes nothing below.
        starts = np.floor(np.arange(self.count)[frames] * self.multiplier).astype(int) - self.left
        index = starts[:, None] + np.arange(specs.CHUNK_STEPS)[None, :]
        inside = (index >= 0) & (index < len(self.steps))
        out = np.zeros((*index.shape, specs.WHISPER_LAYERS, specs.WHISPER_DIM), self.steps.dtype)
        out[inside] = self.steps[index[inside]]
        return out.reshape(len(starts), specs.CHUNK_TOKENS, specs.WHISPER_DIM)


def frame_windows(hidden_states: np.ndarray, seconds: float, fps: int) -> np.ndarray:
    """Every frame's audio window at once [frames, 50, 384] (see FrameWindows)."""
    return FrameWindows(hidden_states, seconds, fps)[:]
