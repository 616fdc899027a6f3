"""Whose work goes first: the priority every request to Triton carries, most urgent first.

A conversational session needs its next frames within tens of milliseconds; a minute of
speech sent to POST /onnx-infer, or an avatar being prepared, can wait a little. Triton's
dynamic batcher serves its queue in priority order: every model's config has
`priority_levels` (as many as there are here) with the default level OFFLINE, and each
request says its level (1 is served first). The ensemble passes its request's priority to its
three steps. Within one execution the batcher still fills the batch from lower levels, so
lower levels are never starved: they ride along with the urgent work, and on a GPU a bigger
batch costs little more. On the CPU, where an execution costs its items, the local server
answers each request as soon as its own items are computed, in the queue's order
(triton_local/python_model.py).
"""
from __future__ import annotations

from enum import IntEnum


class Priority(IntEnum):
    SEGMENT_START = 1  # a session's first frames of a segment: someone waits to see it speak
    SESSION = 2  # a session's frames once its segment plays: due within its lead
    LIVE = 3  # a /ws/live session's frames
    OFFLINE = 4  # POST /onnx-infer, and calls that say nothing (the SDK's default)
    PREPARATION = 5  # an avatar's preparation


LEVELS = len(Priority)
DEFAULT = Priority.OFFLINE
