"""python -m triton_local: serve the exported models with a real local tritonserver.

Generates build/triton_repository from model_repository/ (python backend running
the same ONNX files on the CPU), starts tritonserver, waits until every model is
ready, prints the endpoints and serves until Ctrl-C, starting it again if it dies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contract import logs
from triton_local.launch import serve_until_stopped, start
from triton_local.repository import SOURCE
from triton_local.server import BUILD, Ports, ServerError
from triton_local.supervisor import Supervisor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m triton_local", description=__doc__)
    p.add_argument("--onnx-repository", type=Path, default=SOURCE,
                   help="where `python -m export` wrote the ONNX files (default model_repository)")
    p.add_argument("--target", type=Path, default=BUILD / "triton_repository",
                   help="where to generate the local repository")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    args = p.parse_args(argv)

    logs.configure()
    try:
        server = start(args.onnx_repository, Ports(args.http_port, args.grpc_port, args.metrics_port),
                       args.target)
    except (FileNotFoundError, ServerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    supervisor = Supervisor(server).start()
    print("Ctrl-C stops it (if it dies, it is started again).", flush=True)
    try:
        if serve_until_stopped(supervisor=supervisor):
            return 0
        print(f"stopping: {supervisor.gave_up}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop()


if __name__ == "__main__":
    sys.exit(main())
