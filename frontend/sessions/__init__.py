"""Conversational sessions: an avatar always on screen, on one clock, watched over WebRTC, speaking
speech segments as a voice agent sends them, interrupted at once."""
