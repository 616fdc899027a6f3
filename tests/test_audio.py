"""Audio features: decoding, whisper log-mel, and upstream's per-frame windows."""
from __future__ import annotations

import io
import math

import av
import librosa
import numpy as np
import pytest
import soundfile
from transformers import WhisperFeatureExtractor

from frontend.speech import audio
from support import SPEECH


@pytest.fixture(scope="module")
def speech_16k():
    samples, _ = librosa.load(SPEECH, sr=16000)
    return samples


@pytest.mark.parametrize("kind", ["speech", "noise"])
def test_log_mel_matches_transformers_whisper_extractor(speech_16k, kind):
    x = speech_16k if kind == "speech" else \
        np.random.default_rng(0).normal(0, 0.2, 16000 * 7).astype(np.float32)
    expected = WhisperFeatureExtractor()(x, sampling_rate=16000, return_tensors="np").input_features[0]
    got = audio.log_mel(x)
    assert got.shape == (80, 3000) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_decode_matches_librosa_load(speech_bytes, speech_16k):
    speech = audio.decode(speech_bytes)
    np.testing.assert_array_equal(speech.samples_16k, speech_16k)
    assert speech.original_rate == 22050


def encode_as(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """The fixture re-encoded: by libsndfile (wav, ogg vorbis, mp3), or by FFmpeg (m4a/AAC)."""
    buffer = io.BytesIO()
    if fmt != "m4a":
        soundfile.write(buffer, samples, rate, format={"wav": "WAV", "ogg": "OGG", "mp3": "MP3"}[fmt])
        return buffer.getvalue()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024].astype(np.float32),
                                               format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def aligned_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 4000) -> float:
    """Correlation of `a` and `b` at the lag that best aligns them (lossy codecs
    delay the signal by their priming samples)."""
    n = min(len(a), len(b)) - 2 * max_lag
    lags = range(-max_lag, max_lag + 1, 8)
    best = max(lags, key=lambda k: float(np.dot(a[max_lag + k : max_lag + k + n], b[max_lag : max_lag + n])))
    fine = range(best - 8, best + 9)
    return max(float(np.corrcoef(a[max_lag + k : max_lag + k + n], b[max_lag : max_lag + n])[0, 1]) for k in fine)


@pytest.mark.parametrize("fmt, min_correlation", [("wav", 0.999), ("ogg", 0.9), ("mp3", 0.9), ("m4a", 0.9)])
def test_common_formats_decode_to_the_same_speech(speech_bytes, fmt, min_correlation):
    samples, rate = soundfile.read(io.BytesIO(speech_bytes), dtype="float32")
    decoded = audio.decode(encode_as(samples, rate, fmt))
    reference = audio.decode(speech_bytes)
    assert abs(decoded.seconds - reference.seconds) < 0.1  # codecs pad by a few ms
    assert aligned_correlation(decoded.samples_16k, reference.samples_16k) > min_correlation


def test_aligned_correlation_tells_speech_from_other_speech(speech_bytes):
    """The measure above is not trivially high: the speech against itself reversed is not alike."""
    reference = audio.decode(speech_bytes).samples_16k
    assert aligned_correlation(reference[::-1].copy(), reference) < 0.5


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not audio at all" * 10, "cannot decode"),
])
def test_undecodable_audio_is_an_audio_error(data, message):
    with pytest.raises(audio.AudioError, match=message):
        audio.decode(data)


def test_header_without_samples_is_refused(speech_bytes):
    with pytest.raises(audio.AudioError, match="cannot decode|no samples"):
        audio.decode(speech_bytes[:60])  # the FLAC header alone


def test_truncated_audio_decodes_to_the_part_that_arrived(speech_bytes):
    """A file cut in the middle (an interrupted upload) gives the speech up to the cut."""
    full = audio.decode(speech_bytes)
    half = audio.decode(speech_bytes[: len(speech_bytes) // 2])
    assert 0.3 * full.seconds < half.seconds < 0.7 * full.seconds
    n = len(half.samples_16k) - 2000  # the resampler's edge differs
    np.testing.assert_allclose(half.samples_16k[:n], full.samples_16k[:n], atol=1e-3)


def test_too_long_audio_is_refused(speech_bytes):
    with pytest.raises(audio.AudioError, match="limit is 2 s"):
        audio.decode(speech_bytes, max_seconds=2)


def upstream_windows(features: np.ndarray, seconds: float, fps: int) -> np.ndarray:
    """Upstream's get_whisper_chunk loop, written out literally as the reference.

    (Above 50 fps upstream's right padding is too short and it exits; the
    reference then pads the right with enough zeros, as frame_windows does.)
    """
    multiplier = 50 / fps
    num_frames = math.floor(seconds * fps)
    actual = math.floor(seconds * 50)
    features = features[:actual]
    pad = math.ceil(multiplier)
    right = pad * 3 * 2 if fps <= 50 else 10 * pad
    features = np.concatenate([np.zeros_like(features[: pad * 2]), features,
                               np.zeros((right, *features.shape[1:]), features.dtype)])
    clips = []
    for i in range(num_frames):
        start = math.floor(i * multiplier)
        clip = features[start : start + 10]
        assert clip.shape[0] == 10
        clips.append(clip.reshape(50, 384))
    return np.stack(clips)


@pytest.mark.parametrize("seconds, fps", [
    (5.55578, 25), (5.55578, 30), (3.2, 24), (61.3, 25), (2.0, 60), (1.0, 1), (0.45, 7),
])
def test_frame_windows_follow_upstream_for_any_fps(seconds, fps):
    segments = math.ceil(seconds / 30)
    hidden = np.random.default_rng(1).standard_normal((segments, 1500, 5, 384)).astype(np.float32)
    windows = audio.frame_windows(hidden, seconds, fps)
    assert len(windows) == math.floor(seconds * fps)  # no frame dropped at the end
    np.testing.assert_array_equal(windows, upstream_windows(hidden.reshape(-1, 5, 384), seconds, fps))


def test_mel_segments_split_every_30_seconds():
    samples = np.zeros(16000 * 65, np.float32)
    assert audio.mel_segments(samples).shape == (3, 80, 3000)
    assert audio.mel_segments(samples[:16000]).shape == (1, 80, 3000)


def test_growing_log_mel_is_log_mel_of_every_prefix():
    """The live path's incremental log-mel gives exactly the whole-segment one."""
    samples = np.random.default_rng(3).normal(0, 0.1, 16000 * 31).astype(np.float32)
    growing = audio.GrowingLogMel()
    for n in [150, 201, 5000, 16000, 16000 * 7 + 33, 16000 * 29, 16000 * 30, 16000 * 31]:
        np.testing.assert_array_equal(growing(samples[:n]), audio.log_mel(samples[:n]), err_msg=str(n))
