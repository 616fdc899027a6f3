"""What the service logs reaches its stderr, every line with its time, level and logger (and the
request, session and tenant it belongs to), as text or as JSON: read from real front-end processes."""
from __future__ import annotations

import json
import re
import signal

import httpx

from stack.frontend_process import FrontEnd
from support import BUILD
from triton_local.processes import free_port

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")  # logger next


def test_the_service_logs_its_work_as_text(frontend_server):
    """The shared front end (text, the default): the default avatar's preparation, by the module
    that did it, and the access lines, in one format."""
    httpx.get(f"{frontend_server.url}/readyz")
    lines = frontend_server.log_file.read_text().splitlines()
    assert any(re.match(TEXT_LINE.pattern + r"frontend\.avatars\.jobs avatar 'default' prepared", line)
               for line in lines), "no INFO line of the default avatar's preparation"
    assert any(re.match(TEXT_LINE.pattern + r"uvicorn\.access \[request=\w+\] .*GET /readyz", line) for line in lines)
    assert any(re.match(TEXT_LINE.pattern + r"frontend listening on 127\.0\.0\.1", line) for line in lines)


def test_json_logs_say_a_preparation_and_a_drain_line_by_line(triton, tmp_path, face_png):
    (tmp_path / "face.png").write_bytes(face_png)
    server = FrontEnd(triton.grpc_url, free_port(), log_file=BUILD / "frontend-json-logs.log", env={
        "MUSETALK_LOG_FORMAT": "json", "MUSETALK_AVATAR_DIR": str(tmp_path / "avatars"),
        "MUSETALK_DEFAULT_AVATAR_SOURCE": str(tmp_path / "face.png"), "MUSETALK_DRAIN_SECONDS": "1",
    }).start()
    try:
        assert server.wait_until_ready(120), f"never ready; see {server.log_file}"
        session = httpx.post(f"{server.url}/sessions", json={"fps": 12}, timeout=30)
        assert session.status_code == 201
        server.process.send_signal(signal.SIGTERM)  # the drain: the session is told, then ended
        assert server.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn ends by the signal it was stopped by
    finally:
        server.stop()
    entries = [json.loads(line) for line in server.log_file.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    said = {(e["level"], e["logger"], e["message"]) for e in entries}
    assert ("INFO", "frontend.avatars.jobs", "avatar 'default' prepared (1 frames, 0 without a face)") in said
    drain = [e for e in entries if e["logger"] == "frontend.sessions.registry" and e["message"].startswith("draining")]
    assert drain and drain[0]["message"].startswith("draining: 1 sessions") and "request" not in drain[0]
    assert any(e["logger"] == "frontend.sessions.registry" and e["message"].startswith("drained") for e in entries)
    access = [e for e in entries if e["logger"] == "uvicorn.access" and "POST /sessions" in e["message"]]
    assert access and access[0].get("request")  # which request it was
    created = [e for e in entries if e["logger"] == "frontend.audit"]
    assert created and created[0]["tenant"] == "local" and created[0]["message"].startswith("local created session")
