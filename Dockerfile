# sdedge runtime image: the base install (NumPy + ONNX Runtime, no torch) plus the `serve` extra. It serves the
# API and the page (http://localhost:7860/) on port 7860.
#
#   docker build -t sdedge .
#   docker run -p 7860:7860 -e SDEDGE_TOKEN="$(openssl rand -hex 24)" \
#       -v $PWD/bundle:/bundle:ro -v $PWD/keys/public.pem:/keys/public.pem:ro sdedge serve /bundle
#
# Inside the container the server listens on 0.0.0.0, which `serve` refuses without a token (SDEDGE_TOKEN; the
# page asks for it); `serve /bundle --insecure-no-auth` serves without one.
#
# GPU (CUDA + cuDNN runtime, onnxruntime-gpu; add TensorRT (tensorrt-cu12) with ORT_EXTRA="sdedge[trt]"):
#   docker build -t sdedge:gpu \
#       --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 --build-arg ORT=gpu .
#   docker run --gpus all -p 7860:7860 -v $PWD/bundle:/bundle:ro sdedge:gpu serve /bundle --device cuda ...
#
# Not built on the machines where sdedge is developed (no Docker engine there); linted with hadolint.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE}
# cpu: onnxruntime from the base install; gpu: onnxruntime-gpu in its place
ARG ORT=cpu
ARG ORT_EXTRA=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/sdedge \
    PATH=/opt/sdedge/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The CUDA bases have no Python: install it there (the slim Python base already has it).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdedge ./sdedge
COPY runtime ./runtime
COPY export ./export
COPY trainer ./trainer
COPY benchmarks ./benchmarks

# The base install plus `serve` (fastapi, uvicorn): no torch, no diffusers.
# hadolint ignore=DL3013
RUN pip install ".[serve${ORT_EXTRA:+,}${ORT_EXTRA}]" \
    && if [ "$ORT" = "gpu" ]; then pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.18"; fi \
    && python -c "import sdedge.runtime.server, sys; assert 'torch' not in sys.modules" \
    && python -c "from importlib.resources import files; assert (files('sdedge.runtime') / 'web' / 'index.html').is_file()" \
    && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /home/sdedge --create-home --shell /usr/sbin/nologin sdedge
USER 10001:10001
WORKDIR /home/sdedge

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:7860/readyz', timeout=4).status == 200 else 1)"]

# `docker run IMAGE serve /bundle [options]`. Inside the container the server listens on every interface (so it
# needs SDEDGE_TOKEN, or --insecure-no-auth), and the public key defaults to /keys/public.pem (mount it);
# --public-key / --host on the command line win. The page is at / on port 7860.
ENV SDEDGE_HOST=0.0.0.0 \
    SDEDGE_PUBLIC_KEY=/keys/public.pem
ENTRYPOINT ["python", "-m", "sdedge"]
CMD ["serve", "/bundle"]
