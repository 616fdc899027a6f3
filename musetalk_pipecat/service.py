"""MuseTalkVideoService: TTS audio in, the avatar speaking it out (images and the speech, in step).

    pipeline = Pipeline([transport.input(), stt, llm, tts,
                         MuseTalkVideoService(url="http://localhost:8080", avatar_id="me", fps=25),
                         transport.output()])

It opens a session on the front end (`POST /sessions`) when the pipeline starts, watches it over
WebRTC (WHEP) and sends the TTS's audio to the session's speech socket, a segment per TTS turn
(`TTSStoppedFrame` ends one). Downstream it pushes what the session plays, as it plays it:
`OutputImageRawFrame`s at the session's fps (the avatar idle while the bot is silent, speaking
while it speaks) and the speech as `TTSAudioRawFrame`s, both from the session's one clock, so any
output transport (SmallWebRTC, Daily, LiveKit) delivers them in step; `TTSStartedFrame` /
`TTSStoppedFrame` when the avatar starts and stops speaking a segment (the upstream ones are
consumed: they tell when the TTS made the audio, not when it is heard). On `InterruptionFrame`
it interrupts the session (queued speech dropped, its Triton requests cancelled) and drops what
it holds. Errors of the front end become `ErrorFrame`s carrying its message. When its session goes
away (a replica drained in a rollout, a front end restarted) it moves to a new one and goes on
(a log line says so); what was being said then is not repeated.
"""
from __future__ import annotations

import asyncio

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from client.sessions import AvatarSession

SILENCE = 1e-3  # peak of the idle avatar's audio (-60 dBFS): decoded Opus silence is not quite zero
MAX_FILLED_S = 2.0  # a longer gap in the audio is not the session's silence but a lost connection


class MuseTalkVideoService(AIService):
    def __init__(self, *, url: str, avatar_id: str | None = None, fps: int = 25, reconnect_within_s: float = 60.0,
                 api_key: str | None = None, **kwargs):
        """Args:
            url: the MuseTalk front end (http://host:8080).
            api_key: the front end's API key for this agent's tenant (default: $MUSETALK_API_KEY;
                none for a front end without keys). The agent holds it; its viewers never do.
            avatar_id: a prepared avatar (default: the front end's default avatar).
            fps: the video's frames per second.
            reconnect_within_s: when the session goes away, how long to try opening a new one
                before an ErrorFrame says the front end is gone.
        """
        # Pipecat checks at start that every settings field is given (an ERROR log otherwise).
        kwargs.setdefault("settings", ServiceSettings(model="musetalk"))
        super().__init__(**kwargs)
        self.url, self.avatar_id, self.fps, self.reconnect_within_s = url, avatar_id, fps, reconnect_within_s
        self.api_key = api_key
        self._out_rate = 24000  # the pipeline's audio: the speech socket opens at it before the first TTS audio
        self.session: AvatarSession | None = None
        self.viewer = None
        self.speech = None
        self._speech_rate: int | None = None
        self._tasks: list[asyncio.Task] = []
        self._started = False  # the session's video is flowing
        self._speaking = False  # between the session's speech_started and speech_finished

    # -- lifecycle --------------------------------------------------------------------------
    async def setup(self, setup):
        await super().setup(setup)
        self._out_rate = getattr(setup, "audio_out_sample_rate", None) or self._out_rate

    async def start(self, frame: StartFrame):
        await super().start(frame)
        try:
            self.session = await AvatarSession.open(self.url, self.avatar_id, self.fps, api_key=self.api_key,
                                                    move_within_s=self.reconnect_within_s)
            self.viewer = await self.session.watch()
        except Exception as error:  # noqa: BLE001 - refused, unreachable, timed out: the pipeline hears why
            await self.push_error(f"MuseTalk: cannot open a session on {self.url}: {error}", exception=error)
            return
        self._tasks = [self.create_task(self._images()), self.create_task(self._audio())]
        self._started = True
        # The speech socket, open before the first TTS audio (at the pipeline's output rate, which
        # TTS services produce): the first turn does not wait for its connection.
        await self._open_speech(self._out_rate)

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        await self.close_session()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self.close_session()

    async def close_session(self) -> None:
        """End the session on the front end (also for a host shutting down without ending its
        pipelines: the session's speech would otherwise go on until it expires)."""
        for task in self._tasks:
            await self.cancel_task(task)
        self._tasks = []
        if self.session is not None:
            try:
                await self.session.close()
            except Exception:  # noqa: BLE001 - the front end may be gone: the pipeline ends all the same
                pass
            self.session = self.viewer = self.speech = None

    # -- frames in --------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._speak(frame)
        elif isinstance(frame, TTSStoppedFrame) and direction == FrameDirection.DOWNSTREAM:
            if self.speech is not None:
                await self._send(self.speech.end_segment())
        elif isinstance(frame, TTSStartedFrame) and direction == FrameDirection.DOWNSTREAM:
            pass  # the session says when the avatar starts speaking (speech_started)
        elif isinstance(frame, InterruptionFrame):
            if self.speech is not None:
                await self._send(self.speech.interrupt())
            self._drop_held()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _speak(self, frame: TTSAudioRawFrame) -> None:
        if self.session is None:
            return
        if self.speech is None or frame.sample_rate != self._speech_rate:
            if self.speech is not None:  # another rate: its own socket and segment (the old one ends here)
                await self._send(self.speech.end_segment())
                await self.speech.close()
                self.speech = None
            if not await self._open_speech(frame.sample_rate):
                return
        pcm = np.frombuffer(frame.audio, "<i2")
        if frame.num_channels > 1:  # the session takes mono
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype("<i2")
        await self._send(self.speech.send(pcm.tobytes()))

    async def _open_speech(self, rate: int) -> bool:
        try:
            self.speech = await self.session.speech(rate)
        except OSError as error:
            await self.push_error(f"MuseTalk: the speech socket did not open: {error}", exception=error)
            return False
        self._speech_rate = rate
        self._tasks.append(self.create_task(self._events(self.speech)))
        return True

    async def _send(self, sending) -> None:
        try:
            await sending
        except Exception as error:  # noqa: BLE001 - the socket's close code and reason come as an event
            await self.push_error(f"MuseTalk: the speech socket failed: {error}", exception=error)

    def _drop_held(self) -> None:
        """What arrived and was not pushed yet (a few frames at most) is the interrupted speech."""
        for queue in (self.viewer.video, self.viewer.audio) if self.viewer else ():
            while not queue.empty():
                queue.get_nowait()

    # -- frames out -------------------------------------------------------------------------
    async def _images(self) -> None:
        first = None
        while True:
            received = await self.viewer.video.get()
            if received.frame is None:  # the viewer's connection ended
                await self.push_error(f"MuseTalk: the session's video stopped ({self.url} gone?)")
                return
            rgb = received.frame.to_ndarray(format="rgb24")
            image = OutputImageRawFrame(image=rgb.tobytes(), size=(rgb.shape[1], rgb.shape[0]), format="RGB")
            first = received.rtp_timestamp if first is None else first
            image.pts = ((received.rtp_timestamp - first) & 0xFFFFFFFF) * 1_000_000_000 // 90_000
            await self.push_frame(image)

    async def _audio(self) -> None:
        """The session's audio as TTSAudioRawFrames: its speech, whole, and nothing of the idle
        avatar's silence.

        The session sends no packets through stretches of digital silence (Opus DTX, as WebRTC
        does): a player fills them with silence on its own. Pipecat's output plays audio frames
        back to back, so a pause left out would bring the rest of the speech forward, ahead of
        its images: inside speech, the gaps are filled from the RTP timestamps. The idle
        silence's sparse packets come out of the receiver's jitter buffer late, after the
        speech_started event, and the speech's last ones after its speech_finished: speech begins
        at the first packet that follows the one before it without a gap once speech_started has
        come, and ends at the first gap once speech_finished has (speech is dense; DTX is not)."""
        expected = None  # the RTP timestamp the next packet has, if none is left out
        in_speech = False
        while True:
            received = await self.viewer.audio.get()
            if received.frame is None:
                return
            samples = received.frame.to_ndarray()  # s16, interleaved stereo from Opus
            mono = samples.reshape(-1, len(received.frame.layout.channels)).mean(axis=1)
            rate = received.frame.sample_rate
            gap = (received.rtp_timestamp - expected) & 0xFFFFFFFF if expected is not None else None
            expected = (received.rtp_timestamp + len(mono)) & 0xFFFFFFFF
            if self._speaking and not in_speech and gap == 0:
                in_speech = True
            elif in_speech and not self._speaking and gap != 0:
                in_speech = False
            if not in_speech:
                if np.abs(mono).max() / 32768 < SILENCE:
                    continue  # the idle avatar's silence: nothing is said (the transport plays silence itself)
            elif gap and gap <= MAX_FILLED_S * rate:
                await self.push_frame(TTSAudioRawFrame(audio=bytes(2 * gap), sample_rate=rate, num_channels=1))
            await self.push_frame(TTSAudioRawFrame(audio=mono.astype("<i2").tobytes(), sample_rate=rate,
                                                   num_channels=1))

    async def _events(self, speech) -> None:
        while True:
            event = await speech.event(timeout=24 * 3600)
            if event["type"] == "speech_started":
                self._speaking = True
                await self.push_frame(TTSStartedFrame())
            elif event["type"] == "speech_finished":
                self._speaking = False
                await self.push_frame(TTSStoppedFrame())
            elif event["type"] == "session_moved":  # its replica went away: the avatar goes on from a new one
                if self._speaking:
                    self._speaking = False
                    await self.push_frame(TTSStoppedFrame())
                logger.info(f"MuseTalk: session {event['from']} went away ({event['why']}); "
                            f"moved to session {event['to']} in {event['seconds']:.2f} s")
            elif event["type"] == "error":
                await self.push_error(f"MuseTalk: {event['error']}")
            elif event["type"] == "closed":
                if event.get("code") not in (1000, None) or event.get("reason"):
                    await self.push_error(f"MuseTalk: the speech socket closed ({event.get('code')}): "
                                          f"{event.get('reason') or 'the front end went away'}")
                return
