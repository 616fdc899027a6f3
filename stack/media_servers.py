"""Real media servers on this machine, for the tests and benchmarks of publishing a session:
Janus (a WebRTC SFU, its VideoRoom plugin) behind Janus' own WHIP endpoint (simple-whip-server),
and nginx with its RTMP module (a streaming ingest).

    with LocalJanus() as janus:
        janus.whip_endpoint("avatar")     # (URL, token) a session publishes to
        janus.api                         # Janus' HTTP API, which subscribers use (stack.janus_viewer)

    with LocalRtmp() as rtmp:
        rtmp.url("avatar")                # rtmp://127.0.0.1:PORT/live/avatar

Every port is loopback and their own, except Janus' media: Janus never gathers ICE candidates on
loopback, so it is held to this machine's own address (ice_enforce_list), which the kernel routes
through loopback all the same. Nothing here is a production configuration: the docs' publishing
page has those.
"""
from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
from aioice.ice import get_host_addresses

from client.readiness import wait_for
from stack.turn import free_udp_range
from triton_local.processes import end, free_port, http_ok, signal_group, start_child
from triton_local.server import BUILD

ROOT = Path(__file__).resolve().parents[1]
WHIP_SERVER = ROOT / "build" / "whip-server"
JANUS_LIBS = Path("/usr/lib/x86_64-linux-gnu/janus")
RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
ROOM = 1234
MEDIA_PORTS = 100


class MediaServerError(RuntimeError):
    """A media server is missing, or did not start."""


class Child:
    """A server process with a folder of its own (config, log), started and waited for."""

    name = "server"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.process: subprocess.Popen | None = None

    def launch(self, command: list[str], ready, timeout: float, **popen) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"{self.name}.out").open("ab") as out:
            # A group of its own: a kill takes its workers too (nginx's outlive their master).
            self.process = start_child(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        if not wait_for(ready, timeout, 0.05, give_up=lambda: self.process.poll() is not None):
            tail = self.log_tail()
            self.stop()
            raise MediaServerError(f"{self.name} did not start within {timeout:g} s:\n{tail}")

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.out")):
            text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """As a crash would: SIGKILL, no goodbye to its clients."""
        if self.process is not None:
            signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        end(self.process)
        self.process = None


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MediaServerError(f"{what} is missing ({path}): make test installs it (make debian-packages)")
    return path


def host_address() -> str:
    """This machine's own IPv4 address, the one aiortc offers too (it skips loopback as Janus does)."""
    addresses = get_host_addresses(use_ipv4=True, use_ipv6=False)
    if not addresses:
        raise MediaServerError("no network interface besides loopback: Janus has no address for its media")
    return addresses[0]


class Janus(Child):
    name = "janus"

    def __init__(self, folder: Path, http_port: int, ws_port: int):
        super().__init__(folder)
        self.http_port, self.ws_port = http_port, ws_port
        self.media_first = free_udp_range(MEDIA_PORTS)

    def configure(self) -> Path:
        conf = self.folder / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        disabled_plugins = ",".join(f"libjanus_{p}.so" for p in (
            "audiobridge", "duktape", "echotest", "lua", "nosip", "recordplay", "sip", "streaming", "textroom",
            "videocall", "voicemail"))
        disabled_transports = ",".join(f"libjanus_{t}.so" for t in ("mqtt", "nanomsg", "pfunix", "rabbitmq"))
        disabled_events = ",".join(f"libjanus_{e}.so" for e in ("gelfevh", "mqttevh", "nanomsgevh", "rabbitmqevh",
                                                                  "sampleevh", "wsevh"))
        (conf / "janus.jcfg").write_text(f"""general: {{
    configs_folder = "{conf}"
    plugins_folder = "{JANUS_LIBS}/plugins"
    transports_folder = "{JANUS_LIBS}/transports"
    events_folder = "{JANUS_LIBS}/events"
    loggers_folder = "{JANUS_LIBS}/loggers"
    log_to_stdout = false
    log_to_file = "{self.folder / 'janus.log'}"
    debug_level = 4
    debug_timestamps = true
    debug_colors = false
    session_timeout = 60
}}
media: {{
    ipv6 = false
    rtp_port_range = "{self.media_first}-{self.media_first + MEDIA_PORTS - 1}"
}}
nat: {{
    ice_enforce_list = "{host_address()}"
    ignore_mdns = true
}}
plugins: {{ disable = "{disabled_plugins}" }}
transports: {{ disable = "{disabled_transports}" }}
loggers: {{ disable = "libjanus_jsonlog.so" }}
events: {{ broadcast = false disable = "{disabled_events}" }}
""")
        # The room a session is published to: H.264 (constrained baseline, what sessions send) and Opus.
        (conf / "janus.plugin.videoroom.jcfg").write_text(f"""room-{ROOM}: {{
    description = "a published avatar"
    publishers = 4
    bitrate = 2000000
    fir_freq = 10
    audiocodec = "opus"
    videocodec = "h264"
    h264_profile = "42e01f"
}}
""")
        (conf / "janus.transport.http.jcfg").write_text(f"""general: {{
    base_path = "/janus"
    http = true
    port = {self.http_port}
    ip = "127.0.0.1"
    https = false
}}
admin: {{ admin_http = false admin_https = false }}
""")
        (conf / "janus.transport.websockets.jcfg").write_text(f"""general: {{
    ws = true
    ws_port = {self.ws_port}
    ws_ip = "127.0.0.1"
    wss = false
}}
admin: {{ admin_ws = false admin_wss = false }}
""")
        return conf

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("janus")
        if binary is None:
            raise MediaServerError("janus is missing: apt-get install janus (make test installs it)")
        require(JANUS_LIBS / "plugins" / "libjanus_videoroom.so", "Janus' VideoRoom plugin")
        conf = self.configure()
        self.launch([binary, "-C", str(conf / "janus.jcfg"), "-F", str(conf)],
                    lambda: http_ok(f"http://127.0.0.1:{self.http_port}/janus/info"), timeout)


class WhipServer(Child):
    name = "whip"

    def __init__(self, folder: Path, port: int, janus_ws_port: int):
        super().__init__(folder)
        self.port, self.janus_ws_port = port, janus_ws_port

    def start(self, timeout: float = 20.0) -> None:
        node = shutil.which("node")
        if node is None:
            raise MediaServerError("node is missing: the WHIP server (simple-whip-server) runs on Node.js")
        server = require(WHIP_SERVER / "src" / "server.js", "simple-whip-server (make whip-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "config.js"
        config.write_text("module.exports = " + json.dumps({
            "janus": {"address": f"ws://127.0.0.1:{self.janus_ws_port}"}, "port": self.port, "host": "127.0.0.1",
            "rest": "/whip", "allowTrickle": True, "strictETags": False, "iceServers": []}, indent=2) + ";\n")
        # It must find Janus before it answers: its health check says so (it retries Janus every 2 s).
        self.launch([node, str(server)], lambda: http_ok(f"http://127.0.0.1:{self.port}/whip/healthcheck"),
                    timeout, cwd=server.parent, env={"PATH": "/usr/bin:/bin", "WHIP_CONFIG": str(config),
                                                    "NODE_ENV": "production"})


class LocalJanus:
    """Janus and its WHIP endpoint, on loopback ports of their own; `restart()` after `kill()`
    brings them back on the same ports, with the same endpoints."""

    def __init__(self, folder: Path = BUILD / "janus", whip_port: int | None = None):
        self.folder = Path(folder)
        self.janus = Janus(self.folder / "janus", free_port(), free_port())
        self.whip = WhipServer(self.folder / "whip", whip_port or free_port(), self.janus.ws_port)
        self.endpoints: dict[str, str] = {}  # id -> token

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.janus.http_port}/janus"

    @property
    def whip_base(self) -> str:
        return f"http://127.0.0.1:{self.whip.port}/whip"

    def start(self) -> LocalJanus:
        self.janus.start()
        try:
            self.whip.start()
            for endpoint, token in self.endpoints.items():
                self._create(endpoint, token)
        except BaseException:
            self.stop()
            raise
        return self

    def whip_endpoint(self, endpoint: str) -> tuple[str, str]:
        """A WHIP endpoint that publishes into the room: (its URL, its Bearer token)."""
        token = self.endpoints.setdefault(endpoint, secrets.token_urlsafe(16))
        self._create(endpoint, token)
        return f"{self.whip_base}/endpoint/{endpoint}", token

    def _create(self, endpoint: str, token: str) -> None:
        response = httpx.post(f"{self.whip_base}/create", timeout=10,
                              json={"id": endpoint, "room": ROOM, "token": token, "label": endpoint})
        if response.status_code != 200 and "already exists" not in response.text:
            raise MediaServerError(f"the WHIP server did not create {endpoint!r}: {response.status_code} "
                                   f"{response.text}")

    def kill(self) -> None:
        """Janus dies as in a crash (its WHIP server stays, and finds it again when it is back)."""
        self.janus.kill()

    def restart(self) -> None:
        self.janus.start()

    def stop(self) -> None:
        self.whip.stop()
        self.janus.stop()

    def log_tail(self) -> str:
        return f"janus:\n{self.janus.log_tail()}\nwhip:\n{self.whip.log_tail()}"

    def __enter__(self) -> LocalJanus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalRtmp(Child):
    """nginx with its RTMP module: a live application that readers play what is published to."""

    name = "nginx"

    def __init__(self, folder: Path = BUILD / "rtmp", port: int | None = None):
        super().__init__(folder)
        self.port, self.stat_port = port or free_port(), free_port()

    def url(self, stream: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{stream}"

    def config(self) -> str:
        temp = self.folder / "tmp"
        return f"""load_module {RTMP_MODULE};
daemon off;
master_process on;
worker_processes 1;
pid {self.folder / 'nginx.pid'};
error_log {self.folder / 'error.log'} info;
events {{ worker_connections 256; }}
rtmp {{
    access_log off;
    server {{
        listen 127.0.0.1:{self.port};
        chunk_size 4096;
        application live {{ live on; record off; }}
    }}
}}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{ listen 127.0.0.1:{self.stat_port}; location /stat {{ rtmp_stat all; }} }}
}}
"""

    def start(self, timeout: float = 15.0) -> LocalRtmp:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise MediaServerError("nginx is missing: apt-get install nginx-light (make test installs it)")
        require(RTMP_MODULE, "nginx's RTMP module (apt-get install libnginx-mod-rtmp)")
        (self.folder / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.folder / "nginx.conf"
        conf.write_text(self.config())
        # -e: the error log before the config is read (not /var/log's); SIGTERM stops it at once.
        self.launch([binary, "-p", f"{self.folder}/", "-c", str(conf), "-e", str(self.folder / "error.log")],
                    lambda: http_ok(f"http://127.0.0.1:{self.stat_port}/stat"), timeout)
        return self

    def publishing(self, stream: str) -> bool:
        """Whether a publisher is sending `stream` now (nginx's statistics say)."""
        try:
            stat = httpx.get(f"http://127.0.0.1:{self.stat_port}/stat", timeout=5).text
        except httpx.HTTPError:
            return False
        start = stat.find(f"<name>{stream}</name>")
        return start >= 0 and "<publishing/>" in stat[start:stat.find("</stream>", start)]

    def __enter__(self) -> LocalRtmp:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
