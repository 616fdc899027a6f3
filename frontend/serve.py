"""make serve: the local Triton and the front end together, until Ctrl-C.

The default avatar is prepared at start-up from scikit-image's astronaut
photograph unless MUSETALK_DEFAULT_AVATAR_SOURCE names another image or video.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2

from frontend.stack import FrontEnd
from triton_local.launch import serve_until_stopped
from triton_local.launch import start as start_triton
from triton_local.server import BUILD, Ports


def default_avatar_source() -> str:
    if os.environ.get("MUSETALK_DEFAULT_AVATAR_SOURCE"):
        return os.environ["MUSETALK_DEFAULT_AVATAR_SOURCE"]
    import skimage.data

    photo = BUILD / "astronaut.png"
    if not photo.exists():
        photo.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(photo), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    return str(photo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m frontend.serve", description=__doc__)
    p.add_argument("--onnx-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--port", type=int, default=8080, help="the front end's HTTP port")
    args = p.parse_args(argv)

    server = start_triton(args.onnx_repository, Ports())
    frontend = FrontEnd(server.grpc_url, args.port,
                        env={"MUSETALK_DEFAULT_AVATAR_SOURCE": default_avatar_source()})
    try:
        frontend.start()
        print(f"front end: {frontend.url}  (POST /onnx-infer, docs at {frontend.url}/docs; "
              f"log {frontend.log_file})\nCtrl-C stops both.", flush=True)
        if serve_until_stopped(frontend.process, server.process):
            return 0
        print("a process exited; stopping", file=sys.stderr)
        return 1
    finally:
        frontend.stop()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
