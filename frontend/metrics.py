"""The front end's Prometheus metrics (GET /metrics), beside Triton's own on port 8002.

Together they tell an operator where the bottleneck is: the GPU (Triton's
compute time and GPU utilisation), the batcher (Triton's queue time, its
average batch), or the front ends (the stages below: blending and encoding).
Each front-end replica serves its own; Prometheus adds them up.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds, from a few ms (a GPU's frame) to minutes (the full models on a CPU).
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180, 600)

REQUESTS = Counter("musetalk_requests", "HTTP requests by route and status", ["route", "method", "status"])
REQUEST_SECONDS = Histogram("musetalk_request_seconds", "HTTP request duration by route", ["route"],
                            buckets=SECONDS)
STAGE_SECONDS = Histogram("musetalk_stage_seconds", "Seconds per generation stage, as X-Timings reports them "
                          "(audio_features, waiting_for_triton, blending, encoding, total)", ["stage"],
                          buckets=SECONDS)
FIRST_FRAME_SECONDS = Histogram("musetalk_first_frame_seconds", "Time to the first frame, by answer kind "
                                "(whole mp4, stream, live)", ["kind"], buckets=SECONDS)
FRAMES = Counter("musetalk_frames", "Video frames generated, by answer kind", ["kind"])
TRITON_ERRORS = Counter("musetalk_triton_errors", "Failures talking to Triton, by kind "
                        "(ServerUnavailable, ModelNotReady, ModelNotFound, InvalidInput, InferenceFailed)", ["kind"])
PREPARATIONS = Counter("musetalk_avatar_preparations", "Avatar preparations that ended, by result "
                       "(ready, failed, cancelled)", ["result"])
PREPARATION_SECONDS = Histogram("musetalk_avatar_preparation_seconds", "Seconds to prepare an avatar",
                                buckets=SECONDS)
SESSIONS = Gauge("musetalk_sessions", "Conversational sessions (POST /sessions) open now")
SESSION_THREADS = Gauge("musetalk_session_threads", "Conversational sessions' threads running now (one per session "
                        "until its end has released everything)")
SESSION_ERRORS = Counter("musetalk_session_housekeeping_errors", "Unexpected errors of the sessions' expiry loop "
                         "(logged; the loop goes on)")
LIVE_SLOTS_IN_USE = Gauge("musetalk_live_slots_in_use", "Live-session slots taken now (conversational and /ws/live)")
SESSION_VIEWERS_DROPPED = Counter("musetalk_session_viewers_dropped", "Viewers let go because they could not keep "
                                  "up (a second of video lost while their packets waited)")
SESSION_VIEWERS = Gauge("musetalk_session_viewers", "WebRTC viewers of conversational sessions now")
PUBLICATIONS_LIVE = Gauge("musetalk_publications_live", "Sessions' publications connected to their media server "
                          "now, by kind (whip, rtmp)", ["kind"])
PUBLISH_STATES = Counter("musetalk_publish_states", "Publications' changes of state, by kind and the state entered "
                         "(connecting, live, retrying, stopped)", ["kind", "state"])
SESSION_FRAMES = Counter("musetalk_session_frames", "Conversational sessions' video frames, by kind "
                         "(idle, speech, transition, hold)", ["kind"])
SESSION_PICTURE_LOSS = Counter("musetalk_session_picture_loss", "Viewers' keyframe requests (PLI/FIR), by what "
                               "the session did: keyframe (encoded one), replay (the idle replay's next keyframe "
                               "answers it), throttled (one was sent less than a second ago)", ["result"])
SESSION_SPEECH_START = Histogram("musetalk_session_speech_start_seconds", "From a speech segment's first audio "
                                 "received to its first frame sent", buckets=SECONDS)
LIVE_AUDIO_SECONDS = Counter("musetalk_live_audio_seconds", "Speech that /ws/live sessions have read from their "
                             "clients (they stop reading while their video trails or their inbox is full)")
LIVE_SESSIONS = Gauge("musetalk_live_sessions", "Live sessions (WebSocket /ws/live) open now")
STREAMS = Gauge("musetalk_streams_active", "Streamed answers (POST /onnx-infer stream=true) being sent now")
LIVE_LATENCY = Histogram("musetalk_live_latency_seconds", "Live sessions: from receiving the audio of a frame "
                         "to sending the frame", buckets=SECONDS)

AUTH_FAILURES = Counter("musetalk_auth_failures", "Requests refused for their credential, by reason: missing, "
                        "unknown_key, bad_token, expired_token, token_as_key (a session token where a key is needed), "
                        "other_tenant, other_session, wrong_role, origin (a page of another site)", ["reason"])
OFFLINE_PAUSED = Counter("musetalk_offline_paused_seconds", "Seconds offline work (POST /onnx-infer, avatar "
                         "preparations) waited for live work that someone was waiting for (a segment starting)")
TRITON_READY = Gauge("musetalk_triton_ready", "1 while Triton answers that it is ready (checked every second), "
                     "else 0")
TRITON_OUTAGES = Counter("musetalk_triton_outages", "Times Triton stopped answering that it is ready (it restarted, "
                         "crashed or became unreachable), as the front end's readiness check saw it")

STAGES = ("audio_features", "waiting_for_triton", "blending", "encoding", "total")


def observe_generation(report, kind: str) -> None:
    """A finished generation's stages, frames and time to first frame."""
    for stage in STAGES:
        STAGE_SECONDS.labels(stage).observe(getattr(report, stage))
    FRAMES.labels(kind).inc(report.frames)
    if report.first_frame:
        FIRST_FRAME_SECONDS.labels(kind).observe(report.first_frame)


def triton_error(error: BaseException) -> None:
    from client.errors import TritonClientError

    if isinstance(error, TritonClientError):
        TRITON_ERRORS.labels(type(error).__name__).inc()

ADMISSIONS = Counter("musetalk_admissions", "Admission control: requests admitted at once or after a wait, "
                     "queued (they waited), refused with 429, too_long (503: over MUSETALK_MAX_REQUEST_SECONDS "
                     "at the measured pace), by kind (generation, preparation, session: conversational and /ws/live)",
                     ["kind", "result"])
ADMISSION_IN_USE = Gauge("musetalk_admission_in_use", "Units of work in progress (generation: frames; "
                         "preparation: jobs)", ["kind"])
ADMISSION_CAPACITY = Gauge("musetalk_admission_capacity", "Units of work a front end runs at once", ["kind"])
ADMISSION_WAITING = Gauge("musetalk_admission_waiting", "Requests waiting to be admitted", ["kind"])
