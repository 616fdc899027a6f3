"""make talk: the stack and a Pipecat bot you can talk to, until Ctrl-C.

    python -m stack.talk                   # full-size models (real weights if models/ has them)
    python -m stack.talk --profile tiny    # small random models: up in a minute

The bot (musetalk_pipecat.talk) runs in its own environment (.venv-pipecat: Pipecat's pins
cannot live beside the service's); it listens through Pipecat's SmallWebRTC transport, serves
its page, cuts your turns with Silero VAD and gives each one to the avatar to say back.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from contract import logs
from stack.exports import PROFILES
from stack.serve import start
from triton_local.launch import serve_until_stopped
from triton_local.processes import start_child
from triton_local.server import BUILD

PIPECAT_PYTHON = Path(__file__).resolve().parent.parent / ".venv-pipecat" / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stack.talk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=PROFILES, default="full",
                   help="tiny: small random models of the same architecture (one minute)")
    p.add_argument("--port", type=int, default=8080, help="the front end's HTTP port")
    p.add_argument("--bot-port", type=int, default=7860, help="the bot's page")
    p.add_argument("--fps", type=int, default=25)
    args = p.parse_args(argv)
    if not PIPECAT_PYTHON.exists():
        print("the Pipecat environment is missing: make pipecat-env", file=sys.stderr)
        return 1
    logs.configure()
    stack = start(args.profile, port=args.port)
    if stack is None:
        return 1
    supervisor, frontend = stack
    bot = None
    try:
        if not frontend.wait_until_ready(1800):
            print(f"the front end never became ready; see {frontend.log_file}", file=sys.stderr)
            return 1
        log = (BUILD / "talk.log").open("wb")
        bot = start_child([str(PIPECAT_PYTHON), "-m", "musetalk_pipecat.talk", "--frontend", frontend.url,
                           "--fps", str(args.fps), "--port", str(args.bot_port)],
                          stdout=log, stderr=subprocess.STDOUT)
        print(f"talk to the avatar: http://localhost:{args.bot_port}/ (Connect, then speak; it says back "
              f"what you said)\nfront end {frontend.url}; logs {frontend.log_file}, {BUILD / 'talk.log'}\n"
              "Ctrl-C stops everything.", flush=True)
        if serve_until_stopped(frontend.process, bot, supervisor=supervisor):
            return 0
        print(f"stopping: {supervisor.gave_up or 'a process exited; see its log'}", file=sys.stderr)
        return 1
    finally:
        if bot and bot.poll() is None:
            bot.terminate()
            bot.wait(20)
        frontend.stop()
        supervisor.stop()


if __name__ == "__main__":
    sys.exit(main())
