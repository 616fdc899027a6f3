"""A conversational session from Python: open it, watch it over WebRTC, make it speak."""
import asyncio
import os

import soundfile

from client.sessions import AvatarSession

url = os.environ.get("MUSETALK_URL", "http://localhost:8080")
pcm, rate = soundfile.read(os.environ.get("MUSETALK_SPEECH", "stack/assets/demo_speech.flac"), dtype="int16")


async def main():
    # the key: api_key=..., or $MUSETALK_API_KEY (none for a front end without keys)
    async with await AvatarSession.open(url, fps=25) as session:   # the avatar is on screen, idle
        viewer = await session.watch()                            # WebRTC (WHEP): frames arrive
        speech = await session.speech(sample_rate=rate)
        await speech.send(pcm.tobytes())                          # as fast as a TTS makes it
        await speech.end_segment()
        print(await speech.event("speech_started"))
        frame = await viewer.video.get()                          # Received(frame, arrived, rtp_timestamp)
        print(f"a {frame.frame.width}x{frame.frame.height} frame")
        print(await speech.event("speech_finished"))             # played_seconds, interrupted


asyncio.run(main())
