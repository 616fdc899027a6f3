"""Video out: H.264 + AAC mp4 and fragmented MP4 writers, and the packets WebRTC viewers receive."""
