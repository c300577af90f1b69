# The memoir image: `memoir worker` / `memoir serve` for the compose file's services, or any `memoir` command.
#   docker build -t memoir-service .                                   # torch from PyPI: its CUDA 12 build
#   docker build --build-arg TORCH_CUDA=cu126 -t memoir-service .      # the CUDA 12.6 build (download.pytorch.org)
#   docker build --build-arg TORCH_CUDA=cpu -t memoir-service:cpu .    # the CPU build (a much smaller image)
# Layers: torch, then the project's dependencies (from pyproject.toml alone), then the source, so
# that editing the source rebuilds only the last, small layer.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# TORCH_CUDA: "" (PyPI's default build), "cpu", or a CUDA tag of download.pytorch.org (cu118, cu121,
# cu124, cu126, cu128, ...) that matches the host's driver. TORCH_SPEC: the version (tested: 2.13.0).
ARG TORCH_CUDA=""
ARG TORCH_SPEC="torch>=2.3"
# The extras installed: worker (a model), serve (HTTP), postgres (ledger on PostgreSQL), s3 (tensors
# in object storage), plot (`memoir eval --plot`).
ARG EXTRAS="worker,serve,postgres,s3,plot"
# torch first and alone, so that the project's install never swaps its build.
RUN pip install ${TORCH_CUDA:+--index-url "https://download.pytorch.org/whl/$TORCH_CUDA"} \
        ${TORCH_CUDA:+--extra-index-url https://pypi.org/simple} "$TORCH_SPEC"

WORKDIR /app
# The dependencies, from pyproject.toml alone: empty packages stand in for the source, and the
# project itself is uninstalled again (its dependencies stay).
COPY pyproject.toml README.md ./
RUN for p in memoir store pipeline workers serving; do mkdir -p "$p" && touch "$p/__init__.py"; done \
    && pip install ".[$EXTRAS]" && pip uninstall -y memoir-service \
    && rm -rf memoir store pipeline workers serving build *.egg-info
# The source: only this layer is rebuilt when it changes.
COPY memoir ./memoir
COPY store ./store
COPY pipeline ./pipeline
COPY workers ./workers
COPY serving ./serving
RUN pip install --no-deps . && python -c "import pipeline.cli, workers.worker_command, serving.command"

# Not root: the store and the caches belong to this user (uid 1000; compose's cache-init service
# gives the volumes to MEMOIR_UID:MEMOIR_GID when another user runs the containers).
RUN useradd --create-home --uid 1000 memoir && mkdir -p /data/store /cache/memoir /cache/huggingface \
    && chown -R memoir /data /cache
USER memoir
ENV MEMOIR_STORE=/data/store MEMOIR_CACHE=/cache/memoir HF_HOME=/cache/huggingface

ENTRYPOINT ["memoir"]
CMD ["--help"]
