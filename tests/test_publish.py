"""A session published once to real media servers that fan it out: Janus (its VideoRoom, behind
Janus' own WHIP endpoint, simple-whip-server) read by subscribers through Janus' API, and nginx's
RTMP module read by PyAV; both killed mid-session and brought back.

The subscribers through Janus are not the front end's viewers (it has none): what they see comes
from the one publisher the session holds.
"""
from __future__ import annotations

import asyncio
import threading
import time

import av
import httpx
import numpy as np
import pytest
from test_sessions import SPEAKING_FPS, speech_pcm

from client.sessions import AvatarSession
from stack.janus_viewer import JanusViewer
from stack.media_servers import ROOM, LocalJanus, LocalRtmp
from stack.viewing import Watch
from support import BUILD, KEYS, eventually, eventually_async

RETRY_S = 45  # a dead server noticed (5 s of silence), then tries at most 10 s apart


@pytest.fixture(scope="module")
def janus(publish_ports):
    with LocalJanus(BUILD / "janus", whip_port=publish_ports["whip"]) as server:
        yield server


@pytest.fixture(scope="module")
def rtmp(publish_ports):
    with LocalRtmp(BUILD / "rtmp", port=publish_ports["rtmp"]) as server:
        yield server


def run(coroutine):
    return asyncio.run(coroutine)


async def speak(session: AvatarSession, pcm: bytes):
    speech = await session.speech(16000)
    sent = time.monotonic()
    for i in range(0, len(pcm), 3200):
        await speech.send(pcm[i : i + 3200])
    await speech.end_segment()
    return speech, sent


class RtmpReader:
    """Decodes an RTMP stream on a thread: each video frame's luma and time, the audio's samples."""

    def __init__(self, url: str):
        self.url, self.video, self.audio, self.codecs = url, [], [], None
        self.error: str | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            # A timeout for opening and for each read: a stream that stops never says it ended.
            with av.open(self.url, options={"rtmp_live": "live"}, timeout=(20, 5)) as stream:
                self.codecs = sorted(s.codec_context.name for s in stream.streams)
                for frame in stream.decode(*stream.streams):
                    if isinstance(frame, av.VideoFrame):
                        self.video.append((frame.time, frame.to_ndarray(format="gray")))
                    else:
                        self.audio.append((frame.time, frame.to_ndarray().mean(axis=0)))
                    if self._stop.is_set():
                        return
        except Exception as error:  # noqa: BLE001 - the test reads it
            self.error = f"{type(error).__name__}: {error}"

    def audio_seconds(self) -> float:
        """The samples received, in seconds."""
        return sum(len(samples) for _, samples in self.audio) / 48000

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(15)


def publish(url: str, session_id: str, body: dict) -> dict:
    response = httpx.post(f"{url}/sessions/{session_id}/publish", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def publication(status: dict, publication_id: str) -> dict:
    return next(p for p in status["publications"] if p["id"] == publication_id)


def test_a_session_published_over_whip_is_watched_through_janus_in_sync(frontend_server, janus):
    """Idle and speech frames and the audio reach a subscriber of the room the front end never
    sees, on the session's one clock (the bound direct viewers meet)."""
    pcm, seconds = speech_pcm()
    url, token = janus.whip_endpoint("sync")

    async def scenario():
        session = await AvatarSession.open(frontend_server.url, fps=SPEAKING_FPS, silence_dbfs=None)
        published = publish(frontend_server.url, session.id, {"whip": url, "token": token})
        assert published["state"] in ("connecting", "live") and token not in str(published)
        viewer = await JanusViewer.join(janus.api, ROOM, display="sync")
        watch = Watch(viewer)
        await eventually_async(lambda: asyncio.sleep(0, len(watch.video)), lambda n: n >= SPEAKING_FPS,
                               timeout=20, what="a second of idle frames through Janus")
        idle = watch.idle_picture()
        status = await session.status()
        speech, sent = await speak(session, pcm)
        await speech.event("speech_finished", timeout=60)
        await asyncio.sleep(1.0)  # the last frames through the SFU
        watch.stop()
        await viewer.close()
        await session.close()
        return watch, idle, sent, status

    watch, idle, sent, status = run(scenario())
    assert status["viewers"] == 0 and publication(status, status["publications"][0]["id"])["state"] == "live"
    speech_frames = watch.speech_frames(idle, since=sent)
    assert len(speech_frames) >= 0.8 * seconds * SPEAKING_FPS, (len(speech_frames), seconds)
    onset = watch.audio_onset(since=sent)
    assert onset is not None, "no speech in the audio through Janus"
    assert abs(speech_frames[0][1] - onset) <= 1 / SPEAKING_FPS, (speech_frames[0][1] - onset)


def test_a_session_published_over_rtmp_reads_as_h264_and_aac_on_its_clock(frontend_server, rtmp):
    pcm, seconds = speech_pcm()

    async def scenario():
        session = await AvatarSession.open(frontend_server.url, fps=SPEAKING_FPS, silence_dbfs=None)
        published = publish(frontend_server.url, session.id, {"rtmp": rtmp.url("clock-key")})
        assert "clock-key" not in published["target"]  # a stream key is a secret
        await eventually_async(lambda: asyncio.to_thread(rtmp.publishing, "clock-key"), timeout=20,
                               what="the session publishing to nginx")
        reader = RtmpReader(rtmp.url("clock-key"))
        await eventually_async(lambda: asyncio.sleep(0, len(reader.video)), lambda n: n > 0, timeout=30,
                               what=f"video from nginx (reader: {reader.error})")
        started = time.monotonic()
        speech, _ = await speak(session, pcm)
        await speech.event("speech_finished", timeout=60)
        await asyncio.sleep(1.5)
        ended = time.monotonic()
        status = await session.status()
        await session.close()
        reader.stop()
        return reader, started, ended, status

    reader, started, ended, status = run(scenario())
    assert reader.codecs == ["aac", "h264"], reader.codecs
    times = [t for t, _ in reader.video]
    duration = times[-1] - times[0]
    # Every frame of the session's clock: as many as the stream's span holds, and that span as
    # long as the wall clock it was read over (a stream behind or ahead would drift).
    assert abs(len(times) - 1 - duration * SPEAKING_FPS) <= 2, (len(times), duration)
    assert duration >= (ended - started) - 1.0, (duration, ended - started)
    # The audio: continuous (its samples fill its span), and ending with the video (one clock; a
    # reader that joins starts its video at the next keyframe, its audio at once).
    audio_start, (last_time, last_samples) = reader.audio[0][0], reader.audio[-1]
    audio_end = last_time + len(last_samples) / 48000
    assert abs(reader.audio_seconds() - (audio_end - audio_start)) < 0.1, (reader.audio_seconds(), audio_start)
    assert abs(audio_end - (times[-1] + 1 / SPEAKING_FPS)) < 0.25, (audio_end, times[-1])
    loud = [t for t, samples in reader.audio if np.abs(samples).max() > 0.02]
    assert loud and loud[-1] - loud[0] >= 0.8 * seconds, "the speech is not in the stream's audio"
    assert publication(status, status["publications"][0]["id"])["frames_dropped"] == 0


def test_a_media_server_killed_mid_session_is_retried_and_resumes(frontend_server, janus, rtmp):
    """Janus and nginx die (SIGKILL) while the session speaks: it goes on for its own viewer, each
    publication says it is retrying, and both are live again once their servers are back."""
    url, token = janus.whip_endpoint("restart")
    pcm, _ = speech_pcm(repeat=2)

    async def scenario():
        session = await AvatarSession.open(frontend_server.url, fps=SPEAKING_FPS)
        viewer = await session.watch()
        watch = Watch(viewer, keep_video=False)
        whip = publish(frontend_server.url, session.id, {"whip": url, "token": token})["id"]
        stream = publish(frontend_server.url, session.id, {"rtmp": rtmp.url("restart")})["id"]

        async def states():
            status = await session.status()
            return {publication(status, whip)["state"], publication(status, stream)["state"]}

        await eventually_async(states, lambda s: s == {"live"}, timeout=30, what="both publications live")
        speech, _ = await speak(session, pcm)
        janus.kill()
        rtmp.kill()
        await eventually_async(states, lambda s: s <= {"retrying", "connecting"} and "retrying" in s,
                               timeout=RETRY_S, what="both publications retrying")
        during = len(watch.video)
        await asyncio.sleep(1.0)
        served_meanwhile = len(watch.video) - during
        events = [e for e in speech.seen if e["type"] == "publish_state"]
        janus.restart()
        rtmp.start()
        await eventually_async(states, lambda s: s == {"live"}, timeout=RETRY_S, what="both publications live again")
        subscriber = await JanusViewer.join(janus.api, ROOM, display="restart")
        seen = Watch(subscriber, keep_video=False)
        await eventually_async(lambda: asyncio.sleep(0, len(seen.video)), lambda n: n >= SPEAKING_FPS,
                               timeout=20, what="frames through the restarted Janus")
        reader = RtmpReader(rtmp.url("restart"))
        await eventually_async(lambda: asyncio.sleep(0, len(reader.video)), lambda n: n > 0, timeout=30,
                               what=f"video from the restarted nginx (reader: {reader.error})")
        status = await session.status()
        for w in (watch, seen):
            w.stop()
        reader.stop()
        await subscriber.close()
        await session.close()
        return served_meanwhile, events, status

    served_meanwhile, events, status = run(scenario())
    assert served_meanwhile >= SPEAKING_FPS * 0.5, "the session's own viewer stalled while its publications failed"
    assert {e["state"] for e in events} >= {"retrying"} and all("error" in e for e in events)
    assert status["state"] in ("speaking", "idle") and status["error"] is None
    assert all(p["connections"] >= 2 for p in status["publications"]), status["publications"]


def test_publishing_is_the_owners_and_only_where_the_operator_allows(frontend_server, keyed, janus, rtmp):
    url, token = janus.whip_endpoint("refusals")
    session = httpx.post(f"{frontend_server.url}/sessions", json={"fps": SPEAKING_FPS}, timeout=30).json()
    base = f"{frontend_server.url}/sessions/{session['id']}/publish"
    try:
        for body, status, words in [
            ({}, 422, "whip"),  # neither destination
            ({"whip": url, "rtmp": rtmp.url("x")}, 422, "one"),
            ({"rtmp": "rtmp://203.0.113.9/live/x"}, 403, "MUSETALK_PUBLISH_TO"),  # not an allowed destination
            ({"rtmp": url}, 403, "rtmp"),  # a WHIP URL as RTMP
            ({"whip": url.replace("http://", "http://user:pw@")}, 403, "credentials"),
            ({"whip": url.rsplit("/whip/", 1)[0] + "/whip/../admin"}, 403, "MUSETALK_PUBLISH_TO"),
        ]:
            response = httpx.post(base, json=body, timeout=10)
            assert response.status_code == status and words in response.text, (body, response.status_code,
                                                                                response.text)
        assert httpx.delete(f"{base}/nosuch", timeout=10).status_code == 404
        assert httpx.post(f"{frontend_server.url}/sessions/nosuch/publish", json={"rtmp": rtmp.url("x")},
                          timeout=10).status_code == 404
    finally:
        httpx.delete(f"{frontend_server.url}/sessions/{session['id']}", timeout=30)

    # With keys: the owner's key only (another tenant: 404; the session's viewer token: 403); and
    # where the operator allowed nothing, nothing.
    owner, other = f"Bearer {KEYS['alpha']}", f"Bearer {KEYS['beta']}"
    created = httpx.post(f"{keyed.url}/sessions", json={"fps": SPEAKING_FPS}, headers={"Authorization": owner},
                         timeout=30).json()
    base = f"{keyed.url}/sessions/{created['id']}/publish"
    try:
        body = {"rtmp": rtmp.url("keyed")}
        assert httpx.post(base, json=body, timeout=10).status_code == 401
        assert httpx.post(base, json=body, headers={"Authorization": other}, timeout=10).status_code == 404
        viewer = httpx.post(base, json=body, headers={"Authorization": f"Bearer {created['viewer_token']}"}, timeout=10)
        assert viewer.status_code == 403, viewer.text
        off = httpx.post(base, json=body, headers={"Authorization": owner}, timeout=10)
        assert off.status_code == 403 and "publishing is off" in off.text, off.text
    finally:
        httpx.delete(f"{keyed.url}/sessions/{created['id']}", headers={"Authorization": owner}, timeout=30)


def test_a_publication_deleted_stops_and_frees_its_endpoint(frontend_server, janus):
    url, token = janus.whip_endpoint("deleted")
    session = httpx.post(f"{frontend_server.url}/sessions", json={"fps": SPEAKING_FPS}, timeout=30).json()
    base = f"{frontend_server.url}/sessions/{session['id']}"
    try:
        first = publish(frontend_server.url, session["id"], {"whip": url, "token": token})
        eventually(lambda: httpx.get(base, timeout=10).json()["publications"], lambda p: p[0]["state"] == "live",
                   timeout=30, what="the publication live")
        assert httpx.delete(f"{base}/publish/{first['id']}", timeout=30).status_code == 204
        assert httpx.get(base, timeout=10).json()["publications"] == []
        # The endpoint took the DELETE: the same endpoint takes a new publisher at once.
        second = publish(frontend_server.url, session["id"], {"whip": url, "token": token})
        eventually(lambda: httpx.get(base, timeout=10).json()["publications"], lambda p: p[0]["state"] == "live",
                   timeout=30, what="a second publication to the freed endpoint")
        assert second["id"] != first["id"]
    finally:
        httpx.delete(base, timeout=30)
