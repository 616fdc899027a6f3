"""A real load balancer (Debian's nginx) in front of several front ends, for tests and benchmarks:
what a Kubernetes Service or Ingress does to a replicated front end. Round robin, no affinity
(no cookie: a WHEP player or an agent keeps none), WebSocket upgrades passed through, the next
replica tried when one refuses connections (a replica that is gone).

    with LocalBalancer(["127.0.0.1:8081", "127.0.0.1:8082"]) as balancer:
        balancer.url      # "http://127.0.0.1:<port>"
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from client.readiness import wait_for
from triton_local.processes import end, free_port, listening, start_child
from triton_local.server import BUILD


class BalancerError(RuntimeError):
    """nginx is missing, or did not start."""


class LocalBalancer:
    def __init__(self, upstreams: list[str], port: int | None = None, folder: Path = BUILD / "balancer"):
        self.upstreams, self.port, self.folder = upstreams, port or free_port(), Path(folder)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        temp = " ".join(f"{kind}_temp_path {self.folder / kind};" for kind in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        servers = " ".join(f"server {u} max_fails=1 fail_timeout=2s;" for u in self.upstreams)
        return f"""
worker_processes 1;
daemon off;
pid {self.folder / 'nginx.pid'};
error_log {self.folder / 'error.log'} info;
events {{ worker_connections 512; }}
http {{
  access_log {self.folder / 'access.log'};
  {temp}
  upstream frontends {{ {servers} }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{self.port};
    client_max_body_size 51m;
    location / {{
      proxy_pass http://frontends;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 3600s;
      proxy_buffering off;
      proxy_next_upstream error timeout;
    }}
  }}
}}
"""

    def start(self, timeout: float = 10.0) -> LocalBalancer:
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if binary is None:
            raise BalancerError("nginx is missing: apt-get install nginx-light (make test installs it)")
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):  # nginx's workers may run as nobody
            (self.folder / kind).mkdir(parents=True, exist_ok=True)
            (self.folder / kind).chmod(0o777)
        conf = self.folder / "nginx.conf"
        conf.write_text(self.config())
        output = self.folder / "nginx.out"
        with output.open("wb") as out:
            self.process = start_child([binary, "-c", str(conf), "-p", str(self.folder)],
                                       stdout=out, stderr=subprocess.STDOUT)
        if not wait_for(lambda: listening(self.port), timeout, 0.05, give_up=lambda: self.process.poll() is not None):
            code = self.process.poll()
            self.stop()
            said = output.read_text(errors="replace").strip()[-1000:]
            raise BalancerError(f"nginx did not start (exit code {code}): {said or 'it said nothing'}; "
                                f"see {self.folder / 'error.log'}")
        return self

    def stop(self) -> None:
        end(self.process)
        self.process = None

    def __enter__(self) -> LocalBalancer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
