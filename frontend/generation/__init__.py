"""Frames from speech: the one generation core (Triton requests in flight, in order) and its uses:
whole and streamed answers, live /ws/live sessions."""
