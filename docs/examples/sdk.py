"""MuseTalk's networks on Triton, called by name: numpy arrays in, numpy arrays out."""
import os

import numpy as np

from client import MuseTalkClient

with MuseTalkClient(os.environ.get("MUSETALK_TRITON_URL", "localhost:8001")) as tc:   # gRPC
    tc.wait_until_ready(timeout_s=60)
    windows = np.zeros((4, 50, 384), np.float32)        # 4 frames' audio windows
    latents = np.zeros((4, 8, 32, 32), np.float32)       # the avatar's latents for them
    faces = tc.musetalk(windows, latents)                # the ensemble: -> [4, 256, 256, 3] uint8 BGR
    print(faces.shape, faces.dtype, f"{tc.deadlines.seconds_per_item('musetalk'):.3f} s per frame here")
