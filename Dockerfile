# The memoir image: `memoir worker` for the compose file's worker services, or any `memoir` command.
#   docker build -t memoir-service .                                     # CUDA build of torch (PyPI)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t memoir-service:cpu .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG TORCH_SPEC="torch>=2.3"
ARG TORCH_INDEX=""
# torch first and alone, so that the project's install never swaps its build.
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY memoir ./memoir
COPY store ./store
COPY pipeline ./pipeline
COPY workers ./workers
COPY serving ./serving
RUN pip install ".[worker,postgres,serve,s3]"

# Not root: the store and the caches belong to this user (uid 1000 unless compose says otherwise).
RUN useradd --create-home --uid 1000 memoir && mkdir -p /data/store /cache && chown -R memoir /data /cache
USER memoir
ENV MEMOIR_STORE=/data/store MEMOIR_CACHE=/cache/memoir HF_HOME=/cache/huggingface

ENTRYPOINT ["memoir"]
CMD ["--help"]
