# shardwg container image: a userspace WireGuard gateway, no kernel module needed.
#
#   docker build -t shardwg .
#   docker run -d --name wg0 --cap-drop ALL --cap-add NET_ADMIN --device /dev/net/tun \
#     --read-only --tmpfs /run -p 51820:51820/udp \
#     -v /etc/shardwg/wg0.conf:/etc/wireguard/wg0.conf:ro shardwg
#
# It runs as root, because creating a TUN interface needs CAP_NET_ADMIN and a non-root user
# only gets capabilities as ambient ones, which container runtimes do not hand out. Root is
# harmless here when it holds nothing else: --cap-drop ALL --cap-add NET_ADMIN leaves it
# CAP_NET_ADMIN over the container's own network namespace and no other privilege (no
# --privileged, no host network needed). The mounted config must then be owned by uid 0
# (mode 0600): without CAP_DAC_OVERRIDE root cannot read other users' files.
# See docs/deployment.md for compose, Kubernetes and the environment-variable config.

# Build stage: wheels for shardwg and its dependencies (a compiler is there in case one of
# them has no wheel for this platform); the final image carries neither pip caches nor gcc.
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py ./
COPY shardwg ./shardwg
# SHARDWG_NATIVE_REQUIRED: the image always carries the native data path (libssl3 is in the
# slim base image at run time)
RUN SHARDWG_NATIVE_REQUIRED=1 pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

FROM python:3.11-slim
# wireguard-tools: the stock `wg` tool (wg show / wg set through the UAPI socket); optional.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wireguard-tools \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --disable-pip-version-check --no-index /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SHARDWG_CONFIG=/etc/wireguard/wg0.conf \
    SHARDWG_RUNTIME_DIR=/run/shardwg \
    SHARDWG_WORKERS=auto \
    SHARDWG_LOG_FORMAT=text
# The WireGuard port most configs use; publish the one your config's ListenPort names.
EXPOSE 51820/udp
# The entrypoint validates the config (file or WG_* variables), checks CAP_NET_ADMIN and
# /dev/net/tun, then execs `python -m shardwg run`: the supervisor is PID 1, gets SIGTERM
# directly, reaps its children and exits 0 after removing the interface.
ENTRYPOINT ["python", "-m", "shardwg.container"]
STOPSIGNAL SIGTERM
# Healthy while the gateway answers on its UAPI socket (or /healthz with SHARDWG_METRICS).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-m", "shardwg.container", "--healthcheck"]
