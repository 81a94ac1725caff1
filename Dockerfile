# syntax=docker/dockerfile:1
# disalign: serve a stage-1 model with its DisAlign calibration (also runs the extract and fit jobs).
#
#   CPU (default):  docker build -t disalign .
#   CUDA:           docker build -t disalign:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#
# The entry point is the `disalign` CLI; the default command serves on 0.0.0.0:8000.
# Models and calibrations are mounted at run time (/models, /calibration); nothing is baked in.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA bases come without Python 3.11+: install it there (the slim base already has it).
# hadolint ignore=DL3008
RUN if ! python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
        && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
        && ln -sf /usr/bin/python3.11 /usr/local/bin/python3 && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from the index that matches the base (CPU wheels by default), so the layer caches.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" torch torchvision
COPY pyproject.toml README.md* ./
COPY calib ./calib
COPY feature_extract ./feature_extract
COPY service ./service
COPY disalign ./disalign
# The project's dependencies include uvloop and the httptools parser (uvicorn picks them up).
# hadolint ignore=DL3013
RUN pip install .

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    DISALIGN_MODEL=/models/model.ts \
    DISALIGN_CARD=/models/model.json \
    DISALIGN_CALIBRATION=/calibration
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null && ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
        && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
        && apt-get install -y --no-install-recommends python3.11 \
        && ln -sf /usr/bin/python3.11 /usr/local/bin/python3 && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 disalign \
    && useradd --system --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin disalign
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/disalign
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status != 200)"]
ENTRYPOINT ["disalign"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
