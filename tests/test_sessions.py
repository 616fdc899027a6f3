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

from client import MuseTalkClient
from client.sessions import AvatarSession
from contract.priority import Priority
from stack.frontend_process import FrontEnd
from stack.viewing import Watch, blocks_changed, picture_losses
from support import BUILD, SPEECH, eventually, eventually_async, frames, settled_count
from triton_local.processes import free_port

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


def skipped_by_triton(url: str) -> int:
    """Steps of ensemble requests that Triton never ran because the request was cancelled (Triton
    counts each as a `fail` of that step's model, whether it was queued or next in line):
    cancellation seen on the server's side."""
    with MuseTalkClient(url) as client:
        return sum(int(client.statistics(model).get("inference_stats", {}).get("fail", {}).get("count", 0))
                   for model in ("positional_encoding", "unet", "vae_decoder"))


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
    assert abs(rate - FPS) < 3, rate  # the session's clock; 3 frames/s of margin for a receiver on a busy machine
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


def test_interrupt_cuts_speech_at_once(frontend_server, triton):
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
    # played_seconds: what played by the interrupt, about 1 s; a margin of 1.5 s for a slow machine
    assert finished["interrupted"] is True and 0 < finished["played_seconds"] < 2.5, finished
    # After the interrupt the speech frames stop within a few frames (the face fades out in two:
    # 0.17 s at 12 fps; the rest of the 0.3 s is the receiver's margin).
    last_speech = max(at for _, at in watch.speech_frames(idle))
    assert last_speech - interrupted < 0.3, last_speech - interrupted
    assert blocks_changed(watch.video[-1][0], idle) < 8  # idle again
    assert status["state"] == "idle" and status["segments"]["interrupted"] == 1
    assert status["latency_ms"]["interrupt"]["count"] == 1
    # the rest of the 16 s of speech is never made (Triton's own count, once it has settled)
    assert settled - before < seconds * SPEAKING_FPS / 2


def test_an_early_interrupt_keeps_events_in_order_and_cancels_requests_on_triton(frontend_server, triton):
    """Interrupted while its first batches wait in Triton's queue: the segment gets only
    speech_finished (played 0 s, or speech_started before it, never after), Triton itself skips
    the cancelled requests' next step (its statistics, not the client's count), and the session
    goes on. Another client keeps Triton busy at the session's own level meanwhile, so the
    session's first batches are still queued when the interrupt comes (not a race with the server)."""
    pcm, seconds = speech_pcm(repeat=3)
    audio, latents = frames(32)

    async def scenario(busy):
        session = await AvatarSession.open(frontend_server.url, fps=SPEAKING_FPS, silence_dbfs=None)
        speech = await session.speech(16000)
        ahead = [busy.submit(busy.musetalk, audio, latents, priority=Priority.SEGMENT_START) for _ in range(4)]
        await speech.send(pcm)
        await speech.end_segment()
        await eventually_async(session.status, lambda status: status["triton"]["in_flight"], 30, 0.005,
                               "the segment's first frames on their way")
        await speech.interrupt()
        events = [await speech.event("speech_finished")]
        await speech.send(speech_pcm()[0])  # and the session speaks again
        await speech.end_segment()
        events += [await speech.event("speech_started"), await speech.event("speech_finished", timeout=60)]
        status = await session.status()
        await session.close()
        for future in ahead:
            future.result()
        return speech.seen, status

    skipped = skipped_by_triton(triton.grpc_url)
    with MuseTalkClient(triton.grpc_url, max_in_flight=8) as busy:
        seen, status = run(scenario(busy))
    speech_events = [e for e in seen if e["type"] in ("speech_started", "speech_finished")]
    first = [(e["type"], e.get("played_seconds")) for e in speech_events if e["segment"] == 1]
    assert first in ([("speech_finished", 0.0)], [("speech_started", None), ("speech_finished", first[-1][1])])
    assert [e["type"] for e in speech_events if e["segment"] == 2] == ["speech_started", "speech_finished"]
    assert status["segments"] == {"played": 1, "interrupted": 1, "queued": 0}
    settled_count(triton.grpc_url, "vae_decoder")
    assert skipped_by_triton(triton.grpc_url) > skipped, "no cancelled request was skipped by Triton"


@pytest.mark.parametrize("fps", [7, 29])
def test_a_frame_rate_whose_frames_are_not_whole_samples_plays_and_lives_on(frontend_server, fps):
    """48000 / fps is not whole at 7 or 29 fps: frames' and ticks' audio differ by a sample now and
    then. The segment plays all of its frames and the session is still there, idle."""
    pcm, seconds = speech_pcm()

    async def scenario():
        async with await AvatarSession.open(frontend_server.url, fps=fps) as session:
            speech = await session.speech(16000)
            await speech.send(pcm)
            await speech.end_segment()
            finished = await speech.event("speech_finished", timeout=60)
            await asyncio.sleep(0.5)
            return finished, await session.status(), [e for e in speech.seen if e["type"] == "error"]

    finished, status, errors = run(scenario())
    assert not errors and finished["interrupted"] is False
    assert finished["played_seconds"] == round(math.floor(seconds * fps) / fps, 3)
    assert status["state"] == "idle" and status["frames"]["speech"] == math.floor(seconds * fps)


def test_a_speech_socket_dropped_mid_segment_ends_it_and_the_next_socket_speaks_anew(frontend_server):
    """No segment_end: the socket closes. What arrived plays, the session is idle within a second
    of the end of that audio, and the next socket (at another sample rate) is a segment of its own."""
    pcm, seconds = speech_pcm()
    samples = np.frombuffer(pcm, "<i2").astype(np.float32)
    import soxr

    pcm24 = soxr.resample(samples, 16000, 24000).astype("<i2").tobytes()

    async def scenario():
        async with await AvatarSession.open(frontend_server.url, fps=SPEAKING_FPS) as session:
            first = await session.speech(16000)
            await first.send(pcm)
            await first.close()  # mid-segment, no segment_end
            closed = time.monotonic()
            status = await eventually_async(
                session.status, lambda s: s["segments"]["played"] >= 1 and s["state"] == "idle", seconds + 10, 0.1,
                "the dropped socket's segment ended")
            idle_after = time.monotonic() - closed
            state = status["state"]
            second = await session.speech(24000)
            await second.send(pcm24)
            await second.end_segment()
            started = await second.event("speech_started", timeout=30)
            finished = await second.event("speech_finished", timeout=60)
            return idle_after, state, started, finished

    idle_after, state, started, finished = run(scenario())
    # its audio lasts `seconds` from the close (it was sent at once); the start of generation and a
    # second for the return to idle are the margin
    assert idle_after < seconds + 3 and state == "idle", (idle_after, seconds)
    assert started["segment"] == finished["segment"] == 2
    assert abs(finished["played_seconds"] - seconds) < 0.2 and finished["interrupted"] is False


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
        session = await AvatarSession.open(frontend_server.url, fps=SPEAKING_FPS, follow=False)
        viewer = await session.watch()
        before = triton_executions(triton.grpc_url, "inference_count")["unet"]
        await viewer.video.get()
        await viewer.pc.close()  # vanishes without a DELETE
        await eventually_async(session.status, lambda status: not status["viewers"], 15, 0.2,
                               "a viewer that left no longer counted")
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


@pytest.fixture(scope="module")
def short_lived(frontend_server, triton):
    """A second front end on the same avatars, whose sessions expire after 2 s without a viewer
    or speech."""
    server = FrontEnd(triton.grpc_url, free_port(), log_file=BUILD / "frontend-short-lived.log", host="127.0.0.1",
                      env={"MUSETALK_AVATAR_DIR": frontend_server.env["MUSETALK_AVATAR_DIR"],
                           "MUSETALK_SESSION_IDLE_SECONDS": "2", "MUSETALK_MAX_LIVE_SESSIONS": "2",
                           "MUSETALK_MAX_VIEWERS_PER_SESSION": "2"}).start()
    assert server.wait_until_ready(120), f"never ready; see {server.log_file}"
    yield server
    server.stop()


def held(url: str) -> dict[str, float]:
    """What sessions hold in a front end, by its own gauges."""
    names = ("musetalk_sessions", "musetalk_session_viewers", "musetalk_session_threads", "musetalk_live_slots_in_use")
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {name: sum(float(line.split()[1]) for line in lines if line.startswith(name + " ")) for name in names}


def nothing_held(url: str, within_s: float = 10.0) -> dict[str, float]:
    return eventually(lambda: held(url), lambda counts: not any(counts.values()), within_s, 0.2,
                      "no session, viewer, session thread or slot left")


def test_no_slot_viewer_or_thread_outlives_its_session(short_lived):
    """Every way a session ends (DELETE mid-speech with a viewer and a speech socket; expiry after
    its viewer vanished; a WHEP offer racing DELETE) leaves nothing behind: no session, viewer,
    session thread or live-session slot."""
    url = short_lived.url
    pcm, _ = speech_pcm()

    async def deleted_mid_speech():
        session = await AvatarSession.open(url, fps=SPEAKING_FPS)
        viewer = await session.watch()
        await viewer.video.get()
        speech = await session.speech(16000)
        await speech.send(pcm)
        await speech.end_segment()
        await speech.event("speech_started", timeout=30)
        await session.close()

    async def expired():
        session = await AvatarSession.open(url, fps=SPEAKING_FPS, follow=False)
        viewer = await session.watch()
        await viewer.video.get()
        await viewer.pc.close()  # gone without a word; then nobody watches or speaks for 2 s
        await asyncio.sleep(4)
        assert (await session.http.get(f"/sessions/{session.id}")).status_code == 404
        await session.http.aclose()

    async def raced():
        from aiortc import RTCConfiguration, RTCPeerConnection

        for _ in range(3):
            session = await AvatarSession.open(url, fps=SPEAKING_FPS)
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            offer = session.http.post(session.info["whep"], content=pc.localDescription.sdp,
                                      headers={"Content-Type": "application/sdp"})
            answer, deleted = await asyncio.gather(offer, session.http.delete(f"/sessions/{session.id}"))
            assert deleted.status_code == 200 and answer.status_code in (201, 404), answer.text
            await pc.close()
            await session.http.aclose()

    for ending in (deleted_mid_speech, expired, raced):
        run(ending())
        assert nothing_held(url) == dict.fromkeys(held(url), 0.0), ending.__name__
    assert httpx.post(f"{url}/sessions", json={"fps": 10}).status_code == 201  # and the slots are free


def test_viewers_beyond_the_limit_are_refused_with_429(short_lived):
    async def scenario():
        async with await AvatarSession.open(short_lived.url, fps=10) as session:
            viewers = [await session.watch() for _ in range(2)]
            try:
                await session.watch()
            except Exception as error:  # noqa: BLE001 - the SDK's SessionError
                refused = error
            await viewers[0].close()
            third = await session.watch()  # a place is free again
            return refused, await asyncio.wait_for(third.video.get(), 20)

    refused, frame = run(scenario())
    assert getattr(refused, "status", None) == 429 and "viewers" in str(refused)
    assert frame.frame is not None


def test_a_viewer_that_cannot_keep_up_is_let_go_not_buffered():
    """Its sender takes no packet: the oldest are dropped (memory stays bounded) and, once a second
    of video is lost, the viewer is let go (its player reconnects) rather than fed a broken picture."""
    from types import SimpleNamespace

    from frontend.sessions.viewers import DROPPED_SECONDS, QUEUE_SECONDS, Viewer
    from frontend.video.rtc import EncodedFrame

    async def scenario():
        gone = asyncio.Event()
        viewer = Viewer(SimpleNamespace(id="slow"), "H264", 10, asyncio.get_running_loop(), audio=False)

        async def on_gone(_):
            gone.set()

        viewer.on_gone = on_gone
        for n in range(int((QUEUE_SECONDS + DROPPED_SECONDS) * 10) + 1):
            viewer._push([("video", n, {"H264": EncodedFrame(b"\0" * 100, n == 0)})])
        await asyncio.wait_for(gone.wait(), 1)
        return viewer.video.queue.qsize(), viewer.video.dropped

    held, dropped = run(scenario())
    assert held == QUEUE_SECONDS * 10 and dropped >= DROPPED_SECONDS * 10


def test_the_expiry_loop_survives_an_error_and_counts_it(monkeypatch):
    """One pass that fails (logged, counted) does not end expiry for good."""
    from frontend import metrics
    from frontend.admission import LiveSlots
    from frontend.sessions.registry import Sessions
    from frontend.sessions.turn import IceServers

    sessions = Sessions(None, LiveSlots(1), 60, IceServers([], [], None, 60), None)
    passes = []

    async def expire():
        passes.append(time.monotonic())
        if len(passes) == 1:
            raise RuntimeError("a session's state could not be read")

    monkeypatch.setattr(sessions, "expire", expire)
    before = metrics.SESSION_ERRORS._value.get()

    async def scenario():
        loop = asyncio.ensure_future(sessions.keep_expiring(every_s=0.01))
        await asyncio.sleep(0.2)
        loop.cancel()

    run(scenario())
    assert len(passes) > 3 and metrics.SESSION_ERRORS._value.get() == before + 1


def test_a_session_that_cannot_start_gives_its_slot_back(monkeypatch):
    from frontend.admission import LiveSlots
    from frontend.sessions.registry import Sessions
    from frontend.sessions.session import Session, SessionOptions
    from frontend.sessions.turn import IceServers

    slots = LiveSlots(1)
    sessions = Sessions(None, slots, 60, IceServers([], [], None, 60), None)

    def cannot(self):
        raise RuntimeError("no thread for it")

    monkeypatch.setattr(Session, "start", cannot)
    with pytest.raises(RuntimeError, match="no thread"):
        sessions.create(None, SessionOptions())
    slots.take()  # the one slot is free again
