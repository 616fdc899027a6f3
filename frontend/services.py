"""What the routes share: settings, the Triton client, the avatar store, start-up state.

Built once by create_app and reached by routes through the `services`
dependency, so each route module declares what it uses and nothing is global.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import UploadFile
from starlette.requests import HTTPConnection

from client import MuseTalkClient
from contract.layout import SYNTHETIC_KEY
from frontend import avatars
from frontend.errors import NotReady, UploadTooLarge
from frontend.settings import Settings

log = logging.getLogger("musetalk.frontend")


@dataclass
class Services:
    settings: Settings
    client: MuseTalkClient
    store: avatars.AvatarStore
    preparing: threading.Lock = field(default_factory=threading.Lock)  # one at a time: CPU-heavy
    default_pending: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def create(cls, settings: Settings) -> Services:
        # Each request keeps `in_flight` batches in flight; room for a few requests at once.
        client = MuseTalkClient(settings.triton_url, settings.triton_protocol,
                                max_in_flight=4 * settings.in_flight)
        return cls(settings, client, avatars.AvatarStore(settings.avatar_dir))

    # -- uploads --------------------------------------------------------------------------
    @property
    def upload_limit(self) -> int:
        return int(self.settings.max_upload_mb * 2**20)

    def read_upload(self, upload: UploadFile) -> bytes:
        data = upload.file.read(self.upload_limit + 1)
        if len(data) > self.upload_limit:
            raise UploadTooLarge(f"{upload.filename or 'the file'} is over the "
                                 f"{self.settings.max_upload_mb:g} MB upload limit")
        return data

    # -- avatars --------------------------------------------------------------------------
    def avatar(self, avatar_id: str | None) -> avatars.Avatar:
        """The avatar a request asks for (default: the configured one)."""
        wanted = avatars.check_id(avatar_id or self.settings.default_avatar)
        if wanted == self.settings.default_avatar and self.default_pending.is_set():
            raise NotReady(f"the default avatar {wanted!r} is still being prepared; retry shortly")
        return self.store.load(wanted)

    def prepare(self, avatar_id: str, media: bytes, bbox_shift: int = 0, extra_margin: int = 10):
        with self.preparing:
            self.store.ensure_absent(avatar_id)
            avatar = avatars.prepare(avatar_id, media, self.client.vae_encoder, bbox_shift, extra_margin,
                                     self.settings.max_avatar_frames, progress=log.info,
                                     max_pixels=self.settings.max_image_pixels)
            self.store.save(avatar)
            return avatar

    def start_default_avatar(self) -> None:
        """Prepare the default avatar in the background when it is missing; until it is
        ready, /readyz answers 503."""
        source = self.settings.default_avatar_source
        if not source or self.store.exists(self.settings.default_avatar):
            return
        self.default_pending.set()
        threading.Thread(target=self._prepare_default, args=(Path(source),), daemon=True,
                         name="default-avatar").start()

    def _prepare_default(self, source: Path) -> None:
        try:
            self.client.wait_until_ready(timeout_s=600, models=["vae_encoder"])
            self.prepare(self.settings.default_avatar, source.read_bytes())
            log.info("default avatar %r prepared from %s", self.settings.default_avatar, source)
        except Exception as error:  # noqa: BLE001 - the service runs on; requests will say
            log.error("could not prepare the default avatar: %s", error)
        finally:
            self.default_pending.clear()

    # -- models ---------------------------------------------------------------------------
    def synthetic_weights(self) -> bool | None:
        """Whether the served models have random weights: the setting, else what the
        model config says (the local server records it), else None (unknown)."""
        if self.settings.synthetic_weights is not None:
            return self.settings.synthetic_weights
        try:
            parameters = self.client.model_config("unet").get("parameters", {})
        except Exception:  # noqa: BLE001 - unknown while Triton is away
            return None
        value = parameters.get(SYNTHETIC_KEY, {}).get("string_value")
        return {"true": True, "false": False}.get(value)

    def close(self) -> None:
        self.client.close()


def services(connection: HTTPConnection) -> Services:
    """The dependency every route takes its services from."""
    return connection.app.state.services
