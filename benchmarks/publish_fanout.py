"""What a session's audience costs the front end: N direct WHEP viewers beside N subscribers of
the session published once to Janus (WHIP), on the same replica and session, in one run.

For each N (1, 10, 50 by default) the front end's CPU (its process' CPU seconds over a window, as
a share of one core) and memory (RSS) are measured while the session plays its idle cycle and
speaks; N peers watch it either directly (each a peer connection of the front end) or through
Janus (the front end holds one publisher whatever N is). The peers count the packets they get and
decode nothing (the cost measured is the server's, and 50 decoders would take the machine from
it). Then one decoding viewer of each kind watches a segment: the delay Janus adds is the time
between the first speech frame reaching the direct viewer and reaching the subscriber.

    python -m benchmarks.publish_fanout              # tiny models, results/publish_fanout_tiny_cpu.md
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path

import httpx
import psutil
from aiortc import RTCPeerConnection, RTCSessionDescription

from benchmarks.conversation import speech_pcm
from benchmarks.provenance import invocation, machine, publish

RESULTS = Path(__file__).parent / "results"
FPS = 25


class CountingPeer:
    """A viewer that counts the RTP packets it receives (before any jitter buffer or decoder)."""

    def __init__(self):
        self.pc = RTCPeerConnection()
        self.packets = 0

    def count(self, receiver) -> None:
        async def counted(packet, arrival_time_ms: int) -> None:
            self.packets += 1

        receiver._handle_rtp_packet = counted

    async def direct(self, url: str, session_id: str, http: httpx.AsyncClient) -> None:
        for kind in ("video", "audio"):
            self.count(self.pc.addTransceiver(kind, direction="recvonly").receiver)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        answer = await http.post(f"{url}/sessions/{session_id}/whep", content=self.pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"})
        answer.raise_for_status()
        await self.pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))

    async def through_janus(self, api: str, room: int, display: str, http: httpx.AsyncClient) -> None:
        from stack.janus_viewer import JanusViewer

        janus = JanusViewer(api, http)
        session = (await janus._post("", janus="create"))["data"]["id"]
        janus.session = session
        handle = (await janus._post(f"/{session}", janus="attach", plugin="janus.plugin.videoroom"))["data"]["id"]
        path = f"/{session}/{handle}"
        listed = await janus._post(path, janus="message", body={"request": "listparticipants", "room": room})
        feed = next(p["id"] for p in listed["plugindata"]["data"]["participants"] if p.get("display") == display)
        await janus._post(path, janus="message",
                          body={"request": "join", "ptype": "subscriber", "room": room, "streams": [{"feed": feed}]})
        offer = (await janus._event())["jsep"]
        await self.pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        for transceiver in self.pc.getTransceivers():
            self.count(transceiver.receiver)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await janus._post(path, janus="message", body={"request": "start"},
                          jsep={"type": "answer", "sdp": self.pc.localDescription.sdp})
        await janus._event()

    async def close(self) -> None:
        await self.pc.close()


async def cost(process: psutil.Process, seconds: float) -> dict:
    """The front end's CPU (% of one core) and RSS (MB) over `seconds`."""
    before, started = process.cpu_times(), time.monotonic()
    rss = []
    while time.monotonic() - started < seconds:
        rss.append(process.memory_info().rss)
        await asyncio.sleep(0.5)
    after, elapsed = process.cpu_times(), time.monotonic() - started
    cpu = (after.user + after.system - before.user - before.system) / elapsed * 100
    return {"cpu_percent": round(cpu, 1), "rss_mb": round(statistics.median(rss) / 2**20, 1)}


async def audience(url: str, janus, pid: int, counts: list[int], window: float, pcm: bytes) -> dict:
    """Every N for both kinds of audience, on one session."""
    from client.sessions import AvatarSession
    from stack.media_servers import ROOM

    process = psutil.Process(pid)
    results = {}
    async with httpx.AsyncClient(timeout=60) as http:
        session = await AvatarSession.open(url, fps=FPS)
        endpoint, token = janus.whip_endpoint(f"fanout-{uuid.uuid4().hex[:6]}")
        try:
            results["none"] = await cost(process, window)
            for kind in ("direct", "janus"):
                publication = None
                if kind == "janus":
                    publication = (await http.post(f"{url}/sessions/{session.id}/publish",
                                                   json={"whip": endpoint, "token": token})).json()["id"]
                    await wait_live(http, url, session.id)
                    results["publisher_only"] = await cost(process, window)
                for n in counts:
                    peers = [CountingPeer() for _ in range(n)]
                    for peer in peers:
                        if kind == "direct":
                            await peer.direct(url, session.id, http)
                        else:
                            await peer.through_janus(janus.api, ROOM, endpoint.rsplit("/", 1)[1], http)
                    await asyncio.sleep(2.0)  # connected, first keyframes
                    first = [peer.packets for peer in peers]
                    speech = await session.speech(16000)
                    await speech.send(pcm)
                    await speech.end_segment()
                    measured = await cost(process, window)
                    received = [peer.packets - f for peer, f in zip(peers, first)]
                    measured["packets_per_peer_per_s"] = round(statistics.median(received) / window, 1)
                    measured["peers_receiving"] = sum(1 for r in received if r > 0)
                    await speech.close()
                    print(f"{kind} x{n}: {measured}", flush=True)
                    results[f"{kind}_{n}"] = measured
                    for peer in peers:
                        await peer.close()
                    await asyncio.sleep(2.0)
                if publication is not None:
                    results["latency"] = await latency(url, session, janus, endpoint.rsplit("/", 1)[1], pcm)
                    await http.delete(f"{url}/sessions/{session.id}/publish/{publication}")
        finally:
            await session.close()
    return results


async def wait_live(http: httpx.AsyncClient, url: str, session_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = (await http.get(f"{url}/sessions/{session_id}")).json()
        if status["publications"] and status["publications"][0]["state"] == "live":
            return
        await asyncio.sleep(0.2)
    raise SystemExit(f"the publication never went live: {status['publications']}")


async def latency(url: str, session, janus, display: str, pcm: bytes, segments: int = 5) -> dict:
    """The first speech frame's arrival at a direct viewer and at a subscriber through Janus."""
    from stack.janus_viewer import JanusViewer
    from stack.media_servers import ROOM
    from stack.viewing import Watch

    direct = Watch(await session.watch())
    subscriber = await JanusViewer.join(janus.api, ROOM, display=display)
    through = Watch(subscriber)
    await asyncio.sleep(3.0)
    delays = []
    for _ in range(segments):
        idle_direct, idle_through = direct.idle_picture(), through.idle_picture()
        speech = await session.speech(16000)
        sent = time.monotonic()
        await speech.send(pcm)
        await speech.end_segment()
        await speech.event("speech_finished", timeout=120)
        await speech.close()
        await asyncio.sleep(1.0)
        a = direct.first_speech_frame(idle_direct, sent)
        b = through.first_speech_frame(idle_through, sent)
        if a is not None and b is not None:
            delays.append((b - a) * 1000)
    direct.stop()
    through.stop()
    await subscriber.close()
    return {"segments": len(delays), "added_ms_median": round(statistics.median(delays), 1) if delays else None,
            "added_ms_max": round(max(delays), 1) if delays else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.publish_fanout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["tiny", "full"], default="tiny")
    p.add_argument("--counts", default="1,10,50", help="audience sizes")
    p.add_argument("--window", type=float, default=15.0, help="seconds each cost is measured over")
    p.add_argument("--label", help="results file name (default: the profile, _cpu)")
    args = p.parse_args(argv)

    from stack.exports import ensure_exported
    from stack.frontend_process import LOCAL_SERVER_SETTINGS, FrontEnd
    from stack.media_servers import LocalJanus
    from stack.serve import default_avatar_source
    from triton_local.launch import start
    from triton_local.processes import free_port
    from triton_local.server import BUILD, Ports

    counts = [int(n) for n in args.counts.split(",")]
    pcm = speech_pcm(seconds=4.0)
    server = start(ensure_exported(args.profile), Ports.free(), target=BUILD / "bench_triton", progress=False)
    try:
        with LocalJanus(BUILD / "bench_janus") as janus:
            frontend = FrontEnd(server.grpc_url, free_port(), host="127.0.0.1",
                                log_file=BUILD / "bench_frontend_publish.log", env={
                                    "MUSETALK_AVATAR_DIR": str(BUILD / f"bench_avatars-{args.profile}"),
                                    "MUSETALK_DEFAULT_AVATAR_SOURCE": default_avatar_source(),
                                    **LOCAL_SERVER_SETTINGS, "MUSETALK_MAX_VIEWERS_PER_SESSION": str(max(counts)),
                                    "MUSETALK_PUBLISH_TO": f'["{janus.whip_base}/"]'}).start()
            try:
                if not frontend.wait_until_ready(600):
                    raise SystemExit(f"the front end never became ready; see {frontend.log_file}")
                results = asyncio.run(audience(frontend.url, janus, frontend.process.pid, counts, args.window, pcm))
            finally:
                frontend.stop()
    finally:
        server.stop()
    write(args, argv, counts, results)
    return 0


def write(args, argv, counts: list[int], results: dict) -> None:
    label = args.label or f"{args.profile}_cpu"
    out = RESULTS / f"publish_fanout_{label}.md"
    lines = [f"# A session's audience: direct WHEP viewers beside subscribers through Janus ({args.profile} profile)",
             "", f"- produced by: `{invocation('benchmarks.publish_fanout', argv)}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d')}", "- random weights: real timings, no lip sync",
             f"- one session at {FPS} frames/s; the front end's CPU (% of one core, its process' CPU seconds over "
             f"{args.window:g} s) and median RSS; peers count packets, decode nothing; each row with peers speaks one "
             "4 s segment in its window (the rows without: idle only); RSS never falls back (the allocator keeps "
             "what the 50 direct viewers took)",
             "- Janus 1.1.2 (VideoRoom) behind simple-whip-server, on the same machine", ""]
    none, publisher = results["none"], results.get("publisher_only", {})
    lines += ["| audience | peers | front end CPU % | vs 1 peer | RSS MB | packets/s a peer |",
              "|---|---|---|---|---|---|",
              f"| nobody | 0 | {none['cpu_percent']} | | {none['rss_mb']} | |",
              f"| Janus, no subscriber (the publisher alone) | 0 | {publisher.get('cpu_percent')} | | "
              f"{publisher.get('rss_mb')} | |"]
    for kind, name in (("direct", "direct WHEP viewers"), ("janus", "subscribers through Janus")):
        first = results[f"{kind}_{counts[0]}"]["cpu_percent"]
        for n in counts:
            row = results[f"{kind}_{n}"]
            lines.append(f"| {name} | {n} | {row['cpu_percent']} | {row['cpu_percent'] / first:.2f}x | "
                         f"{row['rss_mb']} | {row['packets_per_peer_per_s']} "
                         f"({row['peers_receiving']}/{n} receiving) |")
    lat = results.get("latency", {})
    lines += ["", f"Delay Janus adds to a segment's first speech frame (subscriber minus direct viewer, "
              f"{lat.get('segments')} segments): median {lat.get('added_ms_median')} ms, "
              f"max {lat.get('added_ms_max')} ms."]
    print(f"results: {publish(out, lines, results)}")


if __name__ == "__main__":
    raise SystemExit(main())
