"""make serve: the local Triton and the front end together, until Ctrl-C.

    python -m stack.serve                  # full-size models (real weights if models/ has them)
    python -m stack.serve --profile tiny   # small random models: the whole stack in a minute

Exports the networks first when needed. The default avatar is prepared at
start-up from scikit-image's astronaut photograph unless
MUSETALK_DEFAULT_AVATAR_SOURCE names another image or video.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from contract import logs
from stack.exports import PROFILES, ensure_exported
from stack.frontend_process import LOCAL_SERVER_SETTINGS, FrontEnd
from triton_local.launch import serve_until_stopped
from triton_local.launch import start as start_triton
from triton_local.server import BUILD, Ports
from triton_local.supervisor import Supervisor


def default_avatar_source() -> str:
    if os.environ.get("MUSETALK_DEFAULT_AVATAR_SOURCE"):
        return os.environ["MUSETALK_DEFAULT_AVATAR_SOURCE"]
    import cv2
    import skimage.data

    photo = BUILD / "astronaut.png"
    if not photo.exists():
        photo.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(photo), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    return str(photo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stack.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=PROFILES, default="full",
                   help="tiny: small random models of the same architecture (one minute)")
    p.add_argument("--onnx-repository", type=Path, help="exported models to serve "
                   "(default: model_repository for full, build/tiny_onnx for tiny)")
    p.add_argument("--port", type=int, default=8080, help="the front end's HTTP port")
    args = p.parse_args(argv)

    logs.configure()
    stack = start(args.profile, args.onnx_repository, args.port)
    if stack is None:
        return 1
    supervisor, frontend = stack
    try:
        print(f"front end: {frontend.url}  (the page at {frontend.url}/, API docs at {frontend.url}/docs; "
              f"log {frontend.log_file})\nCtrl-C stops both (a tritonserver that dies is started again).", flush=True)
        if serve_until_stopped(frontend.process, supervisor=supervisor):
            return 0
        print(f"stopping: {supervisor.gave_up or 'the front end exited; see ' + str(frontend.log_file)}",
              file=sys.stderr)
        return 1
    finally:
        frontend.stop()
        supervisor.stop()


def start(profile: str, onnx_repository: Path | None = None, port: int = 8080):
    """The local Triton (supervised: restarted if it dies) and the front end, both started
    (exporting first when needed): (supervisor, front end); None if the export failed."""
    repository = ensure_exported(profile, onnx_repository)
    if repository is None:
        return None
    supervisor = Supervisor(start_triton(repository, Ports())).start()
    server = supervisor.server
    avatars = BUILD / f"avatars-{profile}"
    frontend = FrontEnd(server.grpc_url, port, env={
        **LOCAL_SERVER_SETTINGS, "MUSETALK_DEFAULT_AVATAR_SOURCE": default_avatar_source(),
        "MUSETALK_AVATAR_DIR": os.environ.get("MUSETALK_AVATAR_DIR", str(avatars)),
    })
    try:
        frontend.start()
    except BaseException:
        supervisor.stop()
        raise
    return supervisor, frontend


if __name__ == "__main__":
    sys.exit(main())
