"""MuseTalk avatars in Pipecat voice agents: `MuseTalkVideoService`, a frame processor between
the TTS and the output transport, backed by a conversational session of the MuseTalk front end
(self-hosted, batched across sessions on one Triton). Installed by `musetalk-triton[pipecat]`;
the service it talks to, and the client SDK, know nothing of Pipecat."""
from musetalk_pipecat.service import MuseTalkVideoService

__all__ = ["MuseTalkVideoService"]
