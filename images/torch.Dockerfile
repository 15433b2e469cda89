# syntax=docker/dockerfile:1
# lorapipe-torch: the image of the train and generate components (CUDA).
# The CUDA runtime comes with torch's own wheels (nvidia-* packages from the same index); the
# node provides only the driver (NVIDIA container toolkit / GPU operator).
# Build context is the repository root:
#   make images REGISTRY=registry.example.com/ml TAG=0.1.0
#   docker build -f images/torch.Dockerfile -t ghcr.io/lorapipe/lorapipe-torch:0.1.0 .
ARG PYTHON_VERSION=3.11.13
ARG DEBIAN_SUITE=bookworm
FROM docker.io/library/python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE}

ARG PYTHON_VERSION
ARG DEBIAN_SUITE
# the CUDA build of torch: cu128 runs on drivers >= 570; pick another variant of the PyTorch
# index (e.g. --build-arg CUDA_VARIANT=cu126) for older drivers
ARG TORCH_VERSION=2.13.0
ARG CUDA_VARIANT=cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${CUDA_VARIANT}
ARG LORAPIPE_VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=https://github.com/lorapipe/lorapipe
ARG APP_UID=1000
ARG APP_GID=1000

LABEL org.opencontainers.image.title="lorapipe-torch" \
      org.opencontainers.image.description="lorapipe train and generate stages (CUDA torch, diffusers, peft, accelerate)" \
      org.opencontainers.image.version="${LORAPIPE_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE}" \
      io.lorapipe.cuda-variant="${CUDA_VARIANT}"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/lorapipe/constraints.txt \
    HOME=/home/lorapipe \
    LORAPIPE_CACHE=/home/lorapipe/.cache/lorapipe \
    HF_HOME=/home/lorapipe/.cache/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --gid "${APP_GID}" lorapipe \
 && useradd --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /home/lorapipe --create-home \
        --shell /usr/sbin/nologin lorapipe \
 && mkdir -p /etc/lorapipe "${LORAPIPE_CACHE}" "${HF_HOME}" \
 && chown -R "${APP_UID}:${APP_GID}" /home/lorapipe \
 && printf 'torch==%s\n' "${TORCH_VERSION}" > /etc/lorapipe/constraints.txt

# torch first, from its own index; the constraint keeps every later install on it
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# the package, a smoke test, then HOME re-owned (the test runs as root; keras writes there)
COPY pyproject.toml README.md /src/
COPY src/ /src/src/
RUN pip install /src \
 && rm -rf /src \
 && lorapipe --help > /dev/null \
 && chown -R "${APP_UID}:${APP_GID}" /home/lorapipe

USER ${APP_UID}:${APP_GID}
WORKDIR /home/lorapipe
ENTRYPOINT ["lorapipe"]
CMD ["--help"]
