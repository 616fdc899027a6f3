"""Conversational sessions against a real uvicorn process and the real local Triton, watched by a
real WebRTC peer (aiortc, through the SDK's client.sessions): idle video at the session's fps with
no Triton call, speech segments, barge-in, one clock for audio and video, clean endings, bad input.

Speech frames are told from idle ones by their pixels: the avatar is a photograph (its idle frame
never changes) and the tiny models' random weights paint noise where the mouth is.
"""
from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import numpy as np
import pytest
import soundfile
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from benchmarks.conversation import Watch, blocks_changed, picture_losses
from client import MuseTalkClient
from client.sessions import AvatarSession
from support import SPEECH, settled_count

FPS = 25  # idle sessions
SPEAKING_FPS = 12  # sessions that speak: the tiny models make about 28 frames/s on 2 cores, all told


def run(coroutine):
    return asyncio.run(coroutine)


def speech_pcm(repeat: int = 1) -> tuple[bytes, float]:
    """The speech fixture as 16 kHz PCM, its leading silence cut (its first frame is speech)."""
    samples, rate = soundfile.read(str(SPEECH), dtype="float32")
    import soxr

    samples = soxr.resample(samples, rate, 16000)
    start = int(np.argmax(np.abs(samples) > 0.02))
    samples = np.tile(samples[start:], repeat)
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes(), len(samples) / 16000


async def open_watched(url: str, fps: int = SPEAKING_FPS, **options):
    session = await AvatarSession.open(url, fps=fps, **options)
    viewer = await session.watch()
    watch = Watch(viewer)
    await asyncio.sleep(1.0)  # the first frames; the idle picture
    assert watch.video, "no video arrived within a second"
    return session, watch


def triton_executions(url: str, counter: str = "execution_count") -> dict[str, int]:
    with MuseTalkClient(url) as client:
        return {m: int(client.statistics(m).get(counter, 0)) for m in ("audio_encoder", "unet")}


def test_an_idle_session_streams_its_avatar_at_its_fps_without_calling_triton(frontend_server, triton):
    async def scenario():
        session, watch = await open_watched(frontend_server.url, fps=FPS)
        before, started = triton_executions(triton.grpc_url), time.monotonic()
        await asyncio.sleep(3.0)
        ended = time.monotonic()
        await asyncio.sleep(0.5)  # what arrived in those 3 s is decoded
        frames = sum(1 for _, at in watch.video if started <= at < ended)
        seconds = ended - started
        status = await session.status()
        after = triton_executions(triton.grpc_url)
        idle = watch.video[0][0]
        moving = max(blocks_changed(picture, idle) for picture, _ in watch.video)
        audio = np.concatenate([samples for samples, _ in watch.audio])
        watch.stop()
        await session.close()
        return frames / seconds, status, before, after, moving, audio

    rate, status, before, after, moving, audio = run(scenario())
    assert abs(rate - FPS) < 3, rate
    assert after == before, "an idle session called Triton"
    assert status["state"] == "idle" and status["frames_sent"] > 3 * FPS
    assert status["frames"]["speech"] == 0 and status["triton"]["requests"] == 0
    assert moving < 8  # a photograph: the same picture, only compression noise
    assert np.abs(audio).max() < 1e-3  # silence


def test_a_segment_plays_every_frame_with_its_audio_on_one_clock(frontend_server):
    pcm, seconds = speech_pcm()
    expected = math.floor(seconds * SPEAKING_FPS)

    async def scenario():
        session, watch = await open_watched(frontend_server.url, silence_dbfs=None, transition_frames=3)
        idle = watch.video[-1][0]
        speech = await session.speech(16000)
        sent = time.monotonic()
        for i in range(0, len(pcm), 3200):  # 100 ms pieces, as fast as a TTS makes them
            await speech.send(pcm[i : i + 3200])
        await speech.end_segment()
        started = await speech.event("speech_started")
        finished = await speech.event("speech_finished")
        await asyncio.sleep(0.5)
        status = await session.status()
        watch.stop()
        await session.close()
        return watch, idle, sent, started, finished, status

    watch, idle, sent, started, finished, status = run(scenario())
    assert started["segment"] == finished["segment"] == 1
    assert finished["played_seconds"] == round(expected / SPEAKING_FPS, 3) and finished["interrupted"] is False
    assert finished["received"] > started["received"]
    speech_frames = watch.speech_frames(idle, since=sent)
    # every speech frame, then the face fading out over transition_frames - 1 more
    assert expected <= len(speech_frames) <= expected + 2, (len(speech_frames), expected)
    assert not watch.gaps(idle, speech_frames)  # no idle frame in the middle of the speech
    # One clock: the first speech frame and the speech's first audio arrive within a frame.
    onset = watch.audio_onset(since=sent)
    assert abs(speech_frames[0][1] - onset) <= 1 / SPEAKING_FPS, (speech_frames[0][1] - onset)
    assert status["frames"]["speech"] == expected and status["segments"]["played"] == 1
    assert status["triton"]["faces"] == expected and status["triton"]["silent_frames"] == 0
    assert status["latency_ms"]["speech_start"]["count"] == 1


def test_two_queued_segments_play_without_a_gap(frontend_server):
    pcm, seconds = speech_pcm()
    half = len(pcm) // 4 * 2

    async def scenario():
        session, watch = await open_watched(frontend_server.url, silence_dbfs=None)
        idle = watch.video[-1][0]
        speech = await session.speech(16000)
        sent = time.monotonic()
        for part in (pcm[:half], pcm[half:]):
            await speech.send(part)
            await speech.end_segment()
        events = [await speech.event(kind) for kind in ("speech_started", "speech_finished") * 2]
        await asyncio.sleep(0.5)
        watch.stop()
        await session.close()
        return watch, idle, sent, events

    watch, idle, sent, events = run(scenario())
    assert [(e["type"], e["segment"]) for e in events] == [
        ("speech_started", 1), ("speech_finished", 1), ("speech_started", 2), ("speech_finished", 2)]
    assert abs(events[2]["received"] - events[1]["received"]) < 1.5 / SPEAKING_FPS  # no gap between them
    frames = watch.speech_frames(idle, since=sent)
    assert not watch.gaps(idle, frames)  # not one idle frame between the two
    total = sum(math.floor(len(part) / 2 / 16000 * SPEAKING_FPS) for part in (pcm[:half], pcm[half:]))
    assert total <= len(frames) <= total + 2


def test_interrupt_cuts_speech_at_once_and_cancels_its_triton_requests(frontend_server, triton):
    pcm, seconds = speech_pcm(repeat=3)

    async def scenario():
        session, watch = await open_watched(frontend_server.url, silence_dbfs=None)
        idle = watch.video[-1][0]
        speech = await session.speech(16000)
        await speech.send(pcm)
        await speech.end_segment()
        await speech.event("speech_started")
        await asyncio.sleep(1.0)
        interrupted = time.monotonic()
        await speech.interrupt()
        finished = await speech.event("speech_finished")
        settled = await asyncio.to_thread(settled_count, triton.grpc_url, "unet")
        status = await session.status()
        watch.stop()
        await session.close()
        return watch, idle, interrupted, finished, status, settled

    before = int(triton_executions(triton.grpc_url, "inference_count")["unet"])
    watch, idle, interrupted, finished, status, settled = run(scenario())
    assert finished["interrupted"] is True and 0 < finished["played_seconds"] < 2.5, finished
    # After the interrupt the speech frames stop within a few frames (the face fades out).
    last_speech = max(at for _, at in watch.speech_frames(idle))
    assert last_speech - interrupted < 0.3, last_speech - interrupted
    assert blocks_changed(watch.video[-1][0], idle) < 8  # idle again
    assert status["state"] == "idle" and status["segments"]["interrupted"] == 1
    assert status["triton"]["cancelled"] >= 1  # requests in flight at the interrupt were cancelled
    assert status["latency_ms"]["interrupt"]["count"] == 1
    # nothing of the dropped speech runs on Triton any more: most of it never ran
    assert settled - before < seconds * SPEAKING_FPS / 2


def test_silent_frames_show_the_avatar_without_a_triton_call(frontend_server):
    pcm, seconds = speech_pcm()
    silence = np.zeros(16000, "<i2").tobytes()  # 1 s of silence inside the segment

    async def scenario():
        async with await AvatarSession.open(frontend_server.url, fps=SPEAKING_FPS) as session:  # default threshold
            speech = await session.speech(16000)
            await speech.send(pcm + silence + pcm)
            await speech.end_segment()
            await speech.event("speech_finished", timeout=90)
            return await session.status()

    status = run(scenario())
    frames = math.floor((2 * len(pcm) + len(silence)) / 2 / 16000 * SPEAKING_FPS)
    assert status["frames"]["speech"] == frames
    assert status["triton"]["silent_frames"] >= SPEAKING_FPS // 2  # most of the second of silence
    assert status["triton"]["faces"] + status["triton"]["silent_frames"] == frames


def test_a_picture_loss_during_the_idle_replay_waits_for_the_replays_keyframe(frontend_server):
    """A viewer's keyframe request (PLI, as aiortc's jitter buffer sends when it loses a picture)
    while the idle cycle is replayed is answered by the replay's next keyframe, not by a live
    encoder: receivers that fall behind would otherwise take every session off its replay."""
    async def scenario():
        session, watch = await open_watched(frontend_server.url, fps=FPS)
        await asyncio.sleep(3.0)  # the replay has reached one of its keyframes (every 2 s) and plays
        receiver = next(r for r in watch.viewer.pc.getReceivers() if r.track.kind == "video")
        ssrc = next(iter(receiver._RTCRtpReceiver__active_ssrc))
        before = await picture_losses(frontend_server.url)
        for _ in range(3):
            await receiver._send_rtcp_pli(ssrc)
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.5)
        after = await picture_losses(frontend_server.url)
        frames = len(watch.video)
        await asyncio.sleep(1.0)
        arriving = len(watch.video) - frames
        watch.stop()
        await session.close()
        return {k: v - before.get(k, 0) for k, v in after.items()}, arriving

    answered, arriving = run(scenario())
    assert answered.get("replay") == 3 and not answered.get("keyframe"), answered
    assert arriving > FPS / 2  # and the video goes on


def test_viewers_that_leave_and_sessions_that_end_free_everything(frontend_server, triton):
    def gauge(name: str) -> float:
        text = httpx.get(f"{frontend_server.url}/metrics").text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))

    async def scenario():
        session = await AvatarSession.open(frontend_server.url, fps=SPEAKING_FPS)
        viewer = await session.watch()
        before = triton_executions(triton.grpc_url, "inference_count")["unet"]
        await viewer.video.get()
        await viewer.pc.close()  # vanishes without a DELETE
        deadline = time.monotonic() + 15
        while (await session.status())["viewers"]:
            assert time.monotonic() < deadline, "a viewer that left is still counted"
            await asyncio.sleep(0.2)
        second = await session.watch()
        await second.video.get()
        speech = await session.speech(16000)
        await speech.send(speech_pcm()[0])
        await speech.end_segment()
        await speech.event("speech_started")
        await session.close()  # mid-speech: viewer, speech socket and Triton requests go with it
        return before, await speech.event("closed")

    before, closed = run(scenario())
    assert closed["type"] == "closed"
    assert httpx.get(f"{frontend_server.url}/sessions").json() == {"sessions": []}
    assert gauge("musetalk_sessions") == 0 and gauge("musetalk_session_viewers") == 0
    ran = settled_count(triton.grpc_url, "unet") - before  # the speech's Triton requests stopped with it
    assert ran < speech_pcm()[1] * SPEAKING_FPS / 2, ran


def test_bad_session_requests_are_clear_errors(frontend_server):
    url = frontend_server.url
    session = httpx.post(f"{url}/sessions", json={"fps": FPS}).json()
    sdp = {"Content-Type": "application/sdp"}
    cases = [
        (httpx.post(f"{url}/sessions", json={"fps": 0}), 422, "fps"),
        (httpx.post(f"{url}/sessions", json={"avatar_id": "nobody"}), 404, "unknown avatar"),
        (httpx.get(f"{url}/sessions/nope"), 404, "unknown session"),
        (httpx.post(f"{url}/sessions/nope/whep", content="v=0", headers=sdp), 404, "unknown session"),
        (httpx.post(f"{url}{session['whep']}", content="not sdp at all", headers=sdp), 400, "SDP offer"),
        (httpx.post(f"{url}{session['whep']}", content="v=0\r\n", headers={"Content-Type": "text/plain"}),
         415, "application/sdp"),
        (httpx.delete(f"{url}{session['whep']}/nobody"), 404, "no viewer"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert message in response.json()["error"], response.json()
    ws = url.replace("http", "ws")
    for path, code, message in [
        ("/sessions/nope/speech", 4404, "unknown session"),
        (f"{session['speech']}?sample_rate=abc", 4422, "sample_rate"),
    ]:
        with connect(ws + path) as socket:
            error = json.loads(socket.recv())
            with pytest.raises(ConnectionClosed) as closed:
                socket.recv()
        assert message in error["error"] and closed.value.rcvd.code == code
    with connect(ws + session["speech"]) as first, connect(ws + session["speech"]) as second:
        error = json.loads(second.recv())
        with pytest.raises(ConnectionClosed) as closed:
            second.recv()
        first.send(b"\0\0" * 160)  # the first one still works
    assert "already has a speech socket" in error["error"] and closed.value.rcvd.code == 4409
    time.sleep(0.3)  # the server has seen the first one go
    with connect(ws + session["speech"]) as socket:
        socket.send("hello")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                socket.recv()
    assert closed.value.rcvd.code == 4422
    assert httpx.delete(f"{url}/sessions/{session['id']}").status_code == 200
    with connect(ws + session["speech"]) as socket:  # a deleted session's speech socket
        assert "unknown session" in socket.recv()
    assert httpx.get(f"{url}/healthz").status_code == 200  # still serving
    assert httpx.delete(f"{url}/sessions/{session['id']}").status_code == 404


def test_sessions_beyond_the_limit_are_refused_with_429(frontend_server):
    url = frontend_server.url  # MUSETALK_MAX_LIVE_SESSIONS=4 (conftest)
    for left in httpx.get(f"{url}/sessions").json()["sessions"]:  # other tests' (a closed page's waits
        httpx.delete(f"{url}/sessions/{left['id']}")             # out session_idle_seconds)
    opened = [httpx.post(f"{url}/sessions", json={"fps": 10}) for _ in range(4)]
    try:
        assert [r.status_code for r in opened] == [201] * 4
        refused = httpx.post(f"{url}/sessions", json={"fps": 10})
        assert refused.status_code == 429 and "live sessions are taken" in refused.json()["error"]
    finally:
        for response in opened:
            httpx.delete(f"{url}/sessions/{response.json()['id']}")
    assert httpx.post(f"{url}/sessions", json={"fps": 10}).status_code == 201  # a slot is free again


def test_a_session_nobody_watches_or_speaks_to_ends_by_itself(triton, tmp_path, face_png):
    from fastapi.testclient import TestClient

    from frontend.app import create_app
    from frontend.settings import Settings

    settings = Settings(triton_url=triton.grpc_url, avatar_dir=tmp_path, session_idle_seconds=1)
    with TestClient(create_app(settings)) as api:
        api.post("/avatars", data={"avatar_id": "default"}, files={"file": ("face.png", face_png, "image/png")})
        session = api.post("/sessions", json={}).json()
        assert api.get(f"/sessions/{session['id']}").status_code == 200
        time.sleep(3)
        assert api.get(f"/sessions/{session['id']}").status_code == 404


def test_an_offer_without_h264_is_answered_in_vp8(frontend_server):
    """A WHEP player that cannot take H.264 gets VP8: the same session, another encoding."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription

    async def scenario():
        session = await AvatarSession.open(frontend_server.url, fps=FPS)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        video = pc.addTransceiver("video", direction="recvonly")
        video.setCodecPreferences([c for c in RTCRtpReceiver.getCapabilities("video").codecs if c.name == "VP8"])
        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(base_url=frontend_server.url) as http:
            answer = await http.post(session.info["whep"], content=pc.localDescription.sdp,
                                     headers={"Content-Type": "application/sdp"})
        assert answer.status_code == 201 and "VP8/90000" in answer.text and "H264" not in answer.text
        await pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))
        frames = [await asyncio.wait_for(video.receiver.track.recv(), 30) for _ in range(10)]
        await pc.close()
        await session.close()
        return frames

    frames = run(scenario())
    assert all(frame.width == 512 for frame in frames)
