# syntax=docker/dockerfile:1
# disalign: serve a stage-1 model with its DisAlign calibration (also runs the extract and fit jobs).
#
#   CPU (default):  docker build -t disalign .
#   CUDA:           docker build -t disalign:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#   No registry:    python deploy/build_image.py   (buildah + a debootstrap base + the local wheels; docs/service.md)
#
# The entry point is the `disalign` CLI; the default command serves on 0.0.0.0:8000.
# Models and calibrations are mounted at run time (/models, /calibration); nothing is baked in.

ARG BASE_IMAGE=python:3.11-slim

# One stage: everything installed is a wheel (no compiler, no build tools to leave behind), so a second
# stage would only copy the 1 GB virtualenv again (measured: 65 s of a 6 min build, and the layer twice).
FROM ${BASE_IMAGE}
# torch is pinned to the version the Makefile installs; CPU wheels by default. An empty TORCH_INDEX_URL
# takes torch from pip's own sources below; an empty TORCHVISION_VERSION leaves torchvision out (it is
# needed only for `torchvision:<arch>` models, detection and GPU JPEG decoding, not to serve TorchScript).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Unset by default: pip's sources where the build cannot reach the public indexes, e.g. a wheel directory
# and a CA bundle mounted into the build with `buildah bud -v` (deploy/build_image.py does this).
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
ARG DEBIAN_FRONTEND=noninteractive
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    DISALIGN_MODEL=/models/model.ts \
    DISALIGN_CARD=/models/model.json \
    DISALIGN_CALIBRATION=/calibration
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA bases come without Python 3.11+: install it there (the slim and Debian bases already have it).
# hadolint ignore=DL3008
RUN if ! python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
        && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
        && ln -sf /usr/bin/python3.11 /usr/local/bin/python3 && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 disalign \
    && useradd --system --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin disalign
WORKDIR /src
# Three layers, from the slowest to change to the fastest: torch, the project's dependencies (read from
# pyproject.toml), the project itself. pip compiles the .pyc files (a read-only container cannot write
# them). Dropped from torch: its C++ headers and test binaries (for extension builds and its own tests).
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
        ${TORCHVISION_VERSION:+"torchvision==${TORCHVISION_VERSION}"} \
    && torch=$(echo /opt/venv/lib/python3*/site-packages/torch) \
    && rm -rf "$torch"/include "$torch"/test "$torch"/bin/test_* "$torch"/bin/*Test "$torch"/bin/protoc*
COPY pyproject.toml ./
# The dependencies include uvloop and the httptools parser (uvicorn picks them up).
# hadolint ignore=DL3013
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY calib ./calib
COPY feature_extract ./feature_extract
COPY service ./service
COPY disalign ./disalign
# hadolint ignore=DL3013
RUN pip install --no-deps . && rm -rf /src/* /tmp/*
USER 10001:10001
WORKDIR /home/disalign
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status != 200)"]
ENTRYPOINT ["disalign"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
