"""Avatars: prepared once from a photo or a video (faces, crops, latents, blend masks), stored,
and composed with generated faces."""
