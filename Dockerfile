# syntax=docker/dockerfile:1
#
# One image for every hami-bus service. The command picks the service:
#   docker run IMAGE python -m services.placement --nats-url nats://nats:4222
# It also carries the native limiter at /usr/local/vgpu/libvgpu.so; the node agent's
# DaemonSet copies it onto each GPU host, where the device plugin mounts it into pods.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- the native limiter (C, plain gcc; no CUDA headers or libraries needed to build)
FROM ${PYTHON_IMAGE} AS limiter
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY isolation/native/ ./
# check-glibc: the limiter must need nothing newer than glibc 2.17 (isolation/native/README.md)
RUN make clean && make all check-glibc

# ---- wheels of the project and all its dependencies
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml ./
COPY shared/ shared/
COPY services/ services/
COPY hami/ hami/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl
COPY --from=limiter /src/build/libvgpu.so /usr/local/vgpu/libvgpu.so
# Unprivileged by default (/auth: where compose's creds writes the credentials into an
# empty volume, which takes this directory's owner and mode); the node agent's DaemonSet runs it as root (it writes
# host directories and the kubelet's device-plugin socket directory).
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin hami \
 && install -d -m 0700 -o 10001 -g 10001 /auth
USER 10001
WORKDIR /tmp
# metrics (Prometheus /metrics and the dashboard); the binder's webhook (HTTPS)
EXPOSE 9394 9443
CMD ["hami", "--help"]
