# syntax=docker/dockerfile:1
# lorapipe-tagger: the image of the tag component (TensorFlow + DeepDanbooru, CPU).
# Build context is the repository root:
#   make images REGISTRY=registry.example.com/ml TAG=0.1.0
#   docker build -f images/tagger.Dockerfile -t ghcr.io/lorapipe/lorapipe-tagger:0.1.0 .
ARG PYTHON_VERSION=3.11.13
ARG DEBIAN_SUITE=bookworm
FROM docker.io/library/python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE}

ARG PYTHON_VERSION
ARG DEBIAN_SUITE
# CPU wheel: without the index pip would pull the multi-GB CUDA build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# the [tagger] extra, pinned (deepdanbooru does not pull TensorFlow by itself)
ARG TENSORFLOW_VERSION=2.21.0
ARG TENSORFLOW_IO_VERSION=0.37.1
ARG DEEPDANBOORU_VERSION=1.0.4
ARG LORAPIPE_VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=https://github.com/lorapipe/lorapipe
ARG APP_UID=1000
ARG APP_GID=1000

LABEL org.opencontainers.image.title="lorapipe-tagger" \
      org.opencontainers.image.description="lorapipe tag stage: DeepDanbooru on TensorFlow (CPU)" \
      org.opencontainers.image.version="${LORAPIPE_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE}"

ENV PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/lorapipe/constraints.txt \
    HOME=/home/lorapipe \
    LORAPIPE_CACHE=/home/lorapipe/.cache/lorapipe \
    HF_HOME=/home/lorapipe/.cache/huggingface \
    KERAS_HOME=/home/lorapipe/.cache/keras

RUN groupadd --gid "${APP_GID}" lorapipe \
 && useradd --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /home/lorapipe --create-home \
        --shell /usr/sbin/nologin lorapipe \
 && mkdir -p /etc/lorapipe "${LORAPIPE_CACHE}" "${HF_HOME}" \
 && chown -R "${APP_UID}:${APP_GID}" /home/lorapipe \
 && printf '%s\n' "torch==${TORCH_VERSION}" "tensorflow==${TENSORFLOW_VERSION}" \
        "tensorflow-io==${TENSORFLOW_IO_VERSION}" "deepdanbooru==${DEEPDANBOORU_VERSION}" \
        > /etc/lorapipe/constraints.txt

# torch first, from its own index; the constraint keeps every later install on it
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# the package, a smoke test, then HOME re-owned (the test runs as root; keras writes there)
COPY pyproject.toml README.md /src/
COPY src/ /src/src/
RUN pip install "/src[tagger]" \
 && rm -rf /src \
 && lorapipe --help > /dev/null \
 && python -c "import deepdanbooru, tensorflow" \
 && chown -R "${APP_UID}:${APP_GID}" /home/lorapipe

USER ${APP_UID}:${APP_GID}
WORKDIR /home/lorapipe
ENTRYPOINT ["lorapipe"]
CMD ["--help"]
