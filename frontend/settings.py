"""Front-end settings, from environment variables (MUSETALK_*) with sensible defaults.

    MUSETALK_TRITON_URL=gpu-host:8001 MUSETALK_BATCH_SIZE=32 uvicorn --factory frontend.app:create_app

Values are parsed and checked by pydantic-settings: a bad value stops the
service at start with the variable's name (MUSETALK_BATCH_SIZE=0 is refused,
MUSETALK_SYNTHETIC_WEIGHTS=false is False).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract import specs


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MUSETALK_", frozen=True, env_parse_none_str="off")

    triton_url: str = Field("localhost:8001", description="Triton's gRPC (or HTTP) host:port")
    api_keys_file: Path | None = Field(
        None, description="who may use the service: one TENANT:KEY a line (TENANT:KEY:operator for an operator, who "
        "also manages the shared avatars); read again when it changes. Callers send Authorization: Bearer KEY. "
        "Without it the service is open, and listens on loopback only")
    open_network: bool = Field(
        False, description="serve without API keys on an address other than loopback (a network you trust: said "
        "at start, as a warning)")
    session_token_seconds: float = Field(
        3600.0, gt=0, description="how long a session's viewer and speaker tokens stay valid (checked when a viewer "
        "or speech socket connects; the owner's key mints fresh ones)")
    allowed_origins: list[str] = Field(
        default_factory=list, description="web pages of other origins allowed to call the service from a browser "
        '(CORS and WebSockets): ["https://app.example.com"]; the page it serves itself is always allowed')
    tenant_live_sessions: int | None = Field(
        None, ge=1, description="live sessions one tenant may hold at once (default: half of max_live_sessions, at "
        "least 1; with API keys only)")
    tenant_frames_in_progress: int | None = Field(
        None, ge=1, description="frames of POST /onnx-infer one tenant may have in progress (default: half of "
        "max_frames_in_progress; with API keys only)")
    tenant_preparations: int | None = Field(
        None, ge=1, description="avatar preparations one tenant may have queued or running (default: half of "
        "max_preparations, at least 1; with API keys only)")
    triton_protocol: Literal["grpc", "http"] = Field(
        "grpc", description="how the front end talks to Triton: gRPC (requests it can cancel) or HTTP")
    avatar_dir: Path = Field(Path("data/avatars"), description="where prepared avatars are stored")
    default_avatar: str = Field("default", description="the avatar of requests that name none (empty: none, "
                                "and such requests are refused)")
    default_avatar_source: str = Field(
        "", description="an image or video prepared as the default avatar at start-up when missing")
    max_audio_seconds: float = Field(120.0, gt=0, description="longest speech of a request (read from the "
                                     "file's header before it is decoded: 422 beyond)")
    max_upload_mb: float = Field(50.0, gt=0, description="largest upload, held to while it streams (413 beyond)")
    max_avatar_seconds: float = Field(
        60.0, gt=0, description="longest avatar video used; a longer one is cut there (and the answer says so)")
    avatar_cache_mb: float = Field(1024.0, gt=0, description="memory for prepared avatars kept loaded")
    prepare_wait_seconds: float = Field(
        5.0, ge=0, description="POST /avatars answers 201 if done by then, else 202 and a status URL")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="largest image or video frame accepted, in pixels (checked before decoding)")
    batch_size: int = Field(16, ge=1, le=specs.MUSETALK.max_batch_size, description="frames per Triton request")
    in_flight: int = Field(4, ge=1, description="batches kept in flight per request")
    session_batch_size: int = Field(
        8, ge=1, le=specs.MUSETALK.max_batch_size, description="frames per Triton request of a live session "
        "(conversational and /ws/live): smaller than batch_size, so each segment's first frames come back sooner")
    x264_preset: str = Field("veryfast", description="x264's preset for answers (superfast, ultrafast: less "
                             "CPU per frame, larger files)")
    max_frames_in_progress: int = Field(
        1500, ge=1, description="admission: frames (seconds x fps of the clips) generated at once by POST "
                                "/onnx-infer; more requests wait (up to admission_queue) or get 429")
    max_request_seconds: float | None = Field(
        600.0, gt=0, description="POST /onnx-infer work that the server would need longer for, at its measured "
        "pace, is refused at once (503 with the estimate) rather than failed after minutes; work that fits alone "
        "waits for the work in progress or gets 429; off: no limit")
    admission_queue: int = Field(8, ge=0, description="requests that may wait for admission")
    admission_wait_seconds: float = Field(10.0, ge=0, description="how long a request waits for admission")
    max_preparations: int = Field(
        4, ge=1, description="avatar preparations queued or running in one front end; more get 429")
    max_live_sessions: int = Field(
        16, ge=1, description="live sessions at once: conversational sessions and WebSocket /ws/live together")
    max_live_seconds: float = Field(600.0, gt=0, description="speech per live session")
    live_idle_seconds: float = Field(
        30.0, gt=0, description="a /ws/live client that sends nothing for this long is closed (4408)")
    max_live_lag_seconds: float = Field(
        10.0, gt=0, description="stop reading a live session's audio while its video trails it by more")
    session_idle_seconds: float = Field(
        60.0, gt=0, description="a session nobody watches or speaks to for this long ends by itself")
    session_transition_frames: int = Field(
        3, ge=0, le=25, description="frames over which a session fades between the avatar's own face and speech")
    session_silence_dbfs: float | None = Field(
        -50.0, le=0, description="a speech frame whose audio window is quieter shows the avatar's own face "
                                 "(no Triton call); off: every speech frame is generated")
    session_ahead_seconds: float = Field(2.0, gt=0, description="a session generates at most this far ahead "
                                                                "of what it plays")
    session_queue_seconds: float = Field(
        60.0, gt=0, description="speech a session queues before its speech socket stops being read")
    webrtc_video_kbps: int = Field(1500, ge=100, le=20000, description="sessions' video bitrate")
    ice_servers: list[dict] = Field(
        default_factory=list, description="STUN servers (or TURN servers with static credentials) for WebRTC, "
        'as browsers\' RTCIceServer JSON: [{"urls": "stun:stun.example.com:3478"}]')
    turn_urls: list[str] = Field(
        default_factory=list, description="TURN servers whose credentials each session mints from turn_secret "
        '(short-lived, the TURN REST API convention): ["turn:turn.example.com:3478?transport=udp", '
        '"turn:turn.example.com:3478?transport=tcp"]')
    turn_secret: SecretStr | None = Field(
        None, description="the TURN server's shared secret (coturn: use-auth-secret, static-auth-secret)")
    turn_ttl_seconds: float = Field(
        86400.0, gt=0, description="how long minted TURN credentials last; the TURN server checks them at "
        "every refresh of a relay, so they must outlast the longest session")
    max_viewers_per_session: int = Field(8, ge=1, description="WebRTC viewers of one session; more get 429")
    publish_to: list[str] = Field(
        default_factory=list, description="where sessions may be published (POST /sessions/{id}/publish): URL "
        'prefixes, ["https://sfu.example.com/whip/", "rtmp://ingest.example.com/live/"]; empty: publishing is off '
        "(a replica connects wherever it is told to publish)")
    max_publications_per_session: int = Field(
        2, ge=1, description="destinations one session publishes to at once (each RTMP one is an encode); more get 429")
    replica_url: str = Field(
        "", description="with several replicas: where the others reach this one (http://POD_IP:8080); a "
        "session's id then says which replica holds it, and any replica forwards its requests there")
    routing_secret: SecretStr | None = Field(
        None, description="the secret every replica shares to sign session ids (default: one made once in "
        "the shared avatar folder, avatar_dir/.routing-secret)")
    priorities: bool = Field(
        True, description="live work first: each request to Triton carries its priority (a session's first "
        "frames before its steady ones, before /ws/live, before POST /onnx-infer, before avatar preparations), "
        "and offline work pauses while someone waits for a session's first frame; off: first come, first served")
    drain_seconds: float = Field(
        60.0, ge=0, description="on SIGTERM (python -m frontend): how long sessions get to move elsewhere "
        "before they are ended")
    synthetic_weights: bool | None = Field(
        None, description="say that the models have random weights (default: ask Triton's model config)")

    @model_validator(mode="after")
    def _turn_needs_its_secret(self) -> Settings:
        if self.turn_urls and self.turn_secret is None:
            raise ValueError("MUSETALK_TURN_URLS needs MUSETALK_TURN_SECRET (the TURN server's shared secret)")
        return self
