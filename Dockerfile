# One image for the backend, the workers and the (optional) local agent of docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLGLM_CACHE_DIR=/cache
WORKDIR /app

# torch first and pinned: a loose torch resolves to another build. From the default index this is the CUDA
# build the GPU workers need; for a CPU-only image pass --build-arg TORCH_INDEX_URL=<your CPU wheel index>.
ARG TORCH_INDEX_URL=""
RUN if [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0; \
    else pip install torch==2.13.0; fi

COPY pyproject.toml README.md ./
COPY flglm ./flglm
COPY backend ./backend
COPY worker ./worker
COPY client_agent ./client_agent
COPY migrations ./migrations
COPY frontend ./frontend
# Editable: the backend serves the dashboard from /app/frontend next to its package.
RUN pip install -e ".[server]"

RUN useradd --create-home --uid 10001 flglm && mkdir -p /data /checkpoints /cache /agent/state \
    && chown -R flglm /data /checkpoints /cache /agent
USER flglm
EXPOSE 8443
CMD ["flglm", "--help"]
