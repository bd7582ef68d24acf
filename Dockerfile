# syntax=docker/dockerfile:1
# rnnserve image. CPU by default; the CUDA image is the same file with another torch wheel index:
#
#   docker build -t rnnserve:0.1.0-cpu .
#   docker build -t rnnserve:0.1.0-cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# CUDA wheels carry their own CUDA runtime and cuDNN (as pip packages), so both images share one
# slim base; the GPU driver comes from the node (NVIDIA container toolkit / device plugin).
# The model repository is baked in at /models (MODEL_REPOSITORY, default the bundled demo
# models) or mounted over /models at run time; see deploy/README.md.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------- build: a venv with rnnserve
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/rnnserve
ENV PATH=/opt/rnnserve/bin:$PATH

# torch first, alone, from the chosen index: it is the big layer and changes least often.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY client/ client/
COPY models/ models/
COPY service/ service/
# The client package first, in the same command: it carries the gRPC stubs the server imports.
RUN pip install --no-cache-dir ./client . \
    && python -c "import service, models, rnnserve_client; print('rnnserve installed')"

# ---------------------------------------------------------------- runtime: serving needs only
FROM ${PYTHON_IMAGE} AS runtime

ARG MODEL_REPOSITORY=demo-repository
ARG VARIANT=cpu

LABEL org.opencontainers.image.title="rnnserve" \
      org.opencontainers.image.description="Model server for recurrent neural networks (REST + gRPC)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.rnnserve.variant="${VARIANT}"

# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
RUN groupadd --system --gid 10001 rnnserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin rnnserve

COPY --from=build /opt/rnnserve /opt/rnnserve
# Owned by root, readable by all: the server reads models and never writes them.
COPY ${MODEL_REPOSITORY}/ /models/

ENV PATH=/opt/rnnserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    RNNSERVE_REPOSITORY=/models \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_HTTP_PORT=8000 \
    RNNSERVE_GRPC_PORT=8001 \
    RNNSERVE_LOG_FORMAT=json

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001

# Liveness only (the process answers); readiness is /readyz, for the orchestrator to ask.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RNNSERVE_HTTP_PORT', '8000') + '/healthz', timeout=4)"]

# Exec form: rnnserve is PID 1 and receives SIGTERM itself (readiness off, drain, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["rnnserve"]
CMD ["serve"]
