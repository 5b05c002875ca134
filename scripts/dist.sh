#!/usr/bin/env bash
# Builds dist/wheelhouse/: the appliance wheel plus every wheel pinned in requirements.lock
# (bundled models included), for CPython 3.11 on x86_64 Linux (Debian 12's python3), so a
# target installs offline and hash-checked, never needing PyPI: `pip install --no-index
# --find-links dist/wheelhouse --require-hashes -r dist/wheelhouse/requirements.lock`, then the
# appliance wheel (built here, so no hash is known in advance) alone with `--no-deps`.
# Writes requirements.lock, VERSION, PYTHON and SHA256SUMS next to the wheels, and the
# diarization speaker model as models/speaker-ge2e.npz (its checksum in SHA256SUMS too).
# DIST_PYTHON=3.12 builds dist/wheelhouse-py3.12 instead (Ubuntu 24.04).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PIP=("$VENV/bin/pip" --disable-pip-version-check)
DIST_PYTHON=${DIST_PYTHON:-3.11}
[[ $DIST_PYTHON =~ ^3\.[0-9]+$ ]] || { echo "DIST_PYTHON must look like 3.11" >&2; exit 2; }
# The lock's hashes cover the Pythons its '# Hashes:' line names (scripts/lock.sh).
grep -qE "^# Hashes: .*CPython( [0-9.]+)* $DIST_PYTHON( |;)" requirements.lock || {
  echo "requirements.lock has no hashes for CPython $DIST_PYTHON: LOCK_PYTHONS=\"3.11 3.12 $DIST_PYTHON\" bash scripts/lock.sh --rehash" >&2
  exit 2
}
OUT=dist/wheelhouse
[ "$DIST_PYTHON" = 3.11 ] || OUT=dist/wheelhouse-py$DIST_PYTHON
TMP=$OUT.tmp
CP=cp${DIST_PYTHON/./}
# Target interpreter and platform: Debian 12 ships CPython 3.11 and glibc 2.36 (Ubuntu 24.04:
# 3.12, glibc 2.39 - its manylinux_2_36-and-older wheels are fine).
# pip does not widen --platform to older manylinux tags itself, so list them all.
TARGET=(--python-version "$DIST_PYTHON" --implementation cp --abi "$CP" --abi abi3 --abi none)
for glibc in $(seq 36 -1 5); do TARGET+=(--platform "manylinux_2_${glibc}_x86_64"); done
TARGET+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

msg() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }

rm -rf "$TMP"
mkdir -p "$TMP"
# The docs site (make docs: build/docs) rides in the wheel as appliance/web/help_site, which the
# app serves at /help/ (appliance/web/help.py); the copy leaves the tree once the wheel is built.
HELP_SITE=appliance/web/help_site
msg "building the documentation site (make docs)"
make --no-print-directory docs
rm -rf "$HELP_SITE"
cp -a build/docs "$HELP_SITE"
trap 'rm -rf "$HELP_SITE"' EXIT
msg "building the appliance wheel"
"${PIP[@]}" wheel -q --no-deps -w "$TMP" .
rm -rf "$HELP_SITE"
msg "downloading the pinned dependency wheels (requirements.lock, hash-checked)"
"${PIP[@]}" download -q --no-deps --only-binary :all: --require-hashes "${TARGET[@]}" -d "$TMP" -r requirements.lock
# The targets install the pins from the lock with --require-hashes, then the appliance wheel.
install -m 0644 requirements.lock "$TMP/requirements.lock"

wheel=$(find "$TMP" -maxdepth 1 -name 'whisper_appliance-*.whl' -printf '%f\n')
version=$(printf '%s' "$wheel" | cut -d- -f2)
[ -n "$version" ] || { echo "no whisper_appliance wheel was built" >&2; exit 1; }
printf '%s\n' "$version" >"$TMP/VERSION"
printf '%s\n' "$DIST_PYTHON" >"$TMP/PYTHON"

# The speaker model for diarization, so no deploy path needs the network for it: Resemblyzer's
# GE2E weights converted to .npz by `python -m appliance.core.diarize fetch` (the sha256-pinned wheel
# from the configured index; kept in .cache/speaker like `make setup` does). The role copies it
# into DATA_DIR/models, the Dockerfile into /opt/whisper-appliance/models.
SPEAKER=.cache/speaker/models/speaker-ge2e.npz
if [ ! -f "$SPEAKER" ]; then
  msg "converting the speaker model (Resemblyzer wheel, sha256-pinned)"
  "$VENV/bin/python" -m appliance.core.diarize fetch .cache/speaker >/dev/null
fi
install -D -m 0644 "$SPEAKER" "$TMP/models/speaker-ge2e.npz"
"$VENV/bin/python" -c 'import sys; from pathlib import Path; from appliance.core.diarize import SpeakerEncoder; SpeakerEncoder.load(Path(sys.argv[1]))' \
  "$TMP/models/speaker-ge2e.npz" || { echo "$SPEAKER is not a usable speaker model" >&2; exit 1; }
(cd "$TMP" && sha256sum -- *.whl models/speaker-ge2e.npz >SHA256SUMS)

# Every pinned requirement must have exactly one wheel here, or the offline install fails later.
expected=$(grep -cE '^[A-Za-z0-9][A-Za-z0-9._-]*==' requirements.lock)  # pins, not hash lines
got=$(( $(find "$TMP" -maxdepth 1 -name '*.whl' | wc -l) - 1 ))
[ "$got" -eq "$expected" ] || { echo "expected $expected dependency wheels, got $got" >&2; exit 1; }
[ "$(grep -c ' models/speaker-ge2e.npz$' "$TMP/SHA256SUMS")" -eq 1 ] || { echo "no speaker model in SHA256SUMS" >&2; exit 1; }

rm -rf "$OUT"
mv "$TMP" "$OUT"
msg "$OUT: whisper-appliance $version + $got wheels + speaker model, $(du -sh "$OUT" | cut -f1)"
