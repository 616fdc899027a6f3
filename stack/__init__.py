"""Running the whole stack on one machine: the local Triton and the front end, as processes.

    python -m stack.serve [--profile tiny]   # make serve: serve until Ctrl-C
    python -m stack.demo  [--profile tiny]   # make demo: the main job, end to end

These launchers sit on top of everything (they export, start tritonserver and
uvicorn); nothing below imports them. The front end itself (frontend/) is only
the FastAPI service and knows nothing of how it was started.
"""
