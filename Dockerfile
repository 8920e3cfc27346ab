# syntax=docker/dockerfile:1.7
# nla-repro on a GPU: CUDA runtime, Python 3.11, the hash-pinned GPU dependency lock
# (docker/requirements-gpu.txt: torch 2.13.0 with its CUDA 13 wheels, bitsandbytes, transformers,
# peft, dvc, ...; the host needs an NVIDIA driver for CUDA 13, branch 580 or newer).
# The repository is mounted from the host at /work (it is not copied in), the DVC and Hugging
# Face caches are volumes, and the entrypoint is invoke:
#   invoke docker-build && invoke docker-run --args "repro --profile gemma-4-e2b-v0.1.dd"
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 from Ubuntu's universe; git for DVC; no recommends, lists removed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev git ca-certificates build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/work/src \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

COPY docker/requirements-gpu.txt /tmp/requirements-gpu.txt
# --require-hashes: every wheel is the one the lock names; the pip cache survives rebuilds.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3.11 -m venv "$VIRTUAL_ENV" \
    && pip install --require-hashes --no-deps -r /tmp/requirements-gpu.txt \
    && rm /tmp/requirements-gpu.txt

# DVC's cache lives in a volume (system-level config; a repo's own cache.dir still wins).
RUN mkdir -p /cache/dvc /cache/huggingface /work \
    && dvc config --system cache.dir /cache/dvc \
    && useradd --create-home --uid 1000 nla \
    && chown -R nla:nla /cache /work

# Non-root: uid 1000 (nla), usually the host user owning the mounted checkout.
USER 1000:1000
WORKDIR /work
VOLUME ["/cache/dvc", "/cache/huggingface"]

HEALTHCHECK --interval=5m --timeout=60s --start-period=30s --retries=2 \
    CMD ["python", "-c", "import sys, torch, bitsandbytes; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', ok, 'bitsandbytes', bitsandbytes.__version__); sys.exit(0 if ok else 1)"]

ENTRYPOINT ["invoke"]
CMD ["--list"]
