"""Speech: decoding, whisper log-mel features and per-frame audio windows, whole or as it arrives."""
