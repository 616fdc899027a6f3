"""A real TURN server (Debian's coturn) on this machine, for tests and benchmarks: a relay that
viewers behind a NAT or a firewall would use, with the shared secret the front end mints
short-lived credentials from (frontend/sessions/turn.py).

    with LocalTurn() as turn:
        turn.url          # "turn:127.0.0.1:3478?transport=udp"
        turn.secret       # MUSETALK_TURN_SECRET for the front end

It listens on loopback only and relays between loopback peers (`allow-loopback-peers`,
which a production TURN server must not have), on a small UDP range of its own.
"""
from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from client.readiness import wait_for
from triton_local.processes import end, free_port, start_child
from triton_local.server import BUILD

RELAY_PORTS = 40


class TurnError(RuntimeError):
    """coturn is missing, or did not start."""


def free_udp_range(count: int) -> int:
    """The first of `count` consecutive UDP ports nothing is bound to now."""
    for first in range(40000, 60000 - count, count):
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise TurnError(f"no {count} consecutive free UDP ports")


class LocalTurn:
    def __init__(self, port: int | None = None, secret: str | None = None, realm: str = "musetalk.local",
                 folder: Path = BUILD / "turn"):
        self.port = port or free_port()
        self.secret = secret or secrets.token_urlsafe(24)
        self.realm, self.folder = realm, Path(folder)
        self.process: subprocess.Popen | None = None
        self.log_file = self.folder / "turnserver.log"

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def config(self, relay_first: int) -> str:
        return "\n".join([
            "listening-ip=127.0.0.1", "relay-ip=127.0.0.1", f"listening-port={self.port}",
            f"min-port={relay_first}", f"max-port={relay_first + RELAY_PORTS - 1}",
            "use-auth-secret", f"static-auth-secret={self.secret}", f"realm={self.realm}",
            "allow-loopback-peers", "no-tls", "no-dtls", "no-tcp-relay", "no-cli", "fingerprint",
            f"pidfile={self.folder / 'turnserver.pid'}", f"userdb={self.folder / 'turndb'}",
            "log-file=stdout", "simple-log", "verbose",
        ]) + "\n"

    def start(self, timeout: float = 15.0) -> LocalTurn:
        binary = shutil.which("turnserver")
        if binary is None:
            raise TurnError("coturn's turnserver is missing: apt-get install coturn (make test installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "turnserver.conf"
        conf.write_text(self.config(free_udp_range(RELAY_PORTS)))
        with self.log_file.open("wb") as log:
            self.process = start_child([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        if not wait_for(self._listening, timeout, 0.1, give_up=lambda: self.process.poll() is not None):
            self.stop()
            raise TurnError(f"turnserver did not start:\n{self.log_tail()}")
        return self

    def _listening(self) -> bool:
        """A STUN binding request on the listening port gets an answer."""
        request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + secrets.token_bytes(12)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(request, ("127.0.0.1", self.port))
                return s.recvfrom(1024)[0][:2] == b"\x01\x01"
            except OSError:
                return False

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self) -> None:
        end(self.process)
        self.process = None

    def __enter__(self) -> LocalTurn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
