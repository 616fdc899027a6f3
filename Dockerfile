# MuseTalk's front end: the FastAPI service on port 8080 (no GPU, no torch).
#
# Every network runs on Triton (Dockerfile.triton), reached at MUSETALK_TRITON_URL;
# this image does the CPU work: audio features, avatars, blending, H.264 encoding.
# Prepared avatars live in /data/avatars: mount a volume there (ReadWriteMany when
# several replicas share it; deploy/ has the Kubernetes manifests).
#
#   docker build -t musetalk-frontend .
#   docker run --rm -p 8080:8080 -e MUSETALK_TRITON_URL=gpu-host:8001 \
#       -v musetalk-avatars:/data/avatars musetalk-frontend
ARG PYTHON_VERSION=3.11.11

# --- build: the project and its [frontend] extra, in a virtual environment -------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only the sources: pyproject.toml lists these packages, so all must be present for the
# build, though the front end imports only contract, client and frontend (small folders;
# weights and exports never are in them).
COPY pyproject.toml constraints.txt ./
COPY contract/ contract/
COPY client/ client/
COPY frontend/ frontend/
COPY export/ export/
COPY triton_local/ triton_local/
COPY stack/ stack/
COPY benchmarks/ benchmarks/
COPY musetalk_pipecat/ musetalk_pipecat/
# Every version is pinned (pyproject.toml; constraints.txt for what the SDK asks for by range).
# Binary wheels carry their native libraries (FFmpeg in av, libsndfile in soundfile, dlib, OpenCV
# headless): no apt packages.
RUN /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ".[frontend]"

# --- runtime -------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm
# A fixed non-root uid/gid (Kubernetes runAsUser: 10001 matches), owning the avatar folder.
RUN groupadd --system --gid 10001 musetalk \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin musetalk \
    && mkdir -p /data/avatars \
    && chown -R 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
# NUMBA_CACHE_DIR: librosa's numba functions cache their compiled code at import, and
# site-packages is not writable (the root filesystem is read-only under Kubernetes).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MUSETALK_AVATAR_DIR=/data/avatars
WORKDIR /data
USER 10001:10001
VOLUME ["/data/avatars"]
EXPOSE 8080

# Alive (GET /healthz); whether it can serve (Triton ready, default avatar prepared) is
# GET /readyz. No curl in the slim image: Python's urllib.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

# uvicorn, with a drain on SIGTERM (sessions told to move, then ended: frontend/__main__.py).
# WebSocket messages above 2 MiB (decompressed) are refused by uvicorn itself (1009); the routes
# refuse PCM messages above 1 MiB with a JSON error (4413).
CMD ["python", "-m", "frontend", "--host", "0.0.0.0", "--port", "8080"]
