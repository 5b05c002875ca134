#!/usr/bin/env bash
# Builds the appliance's Proxmox CT template (docs/install/ct-template.md):
#   dist/image/whisper-appliance-<version>-debian-12_amd64.tar.zst  + .tar.zst.sha256
# from the Debian 12 base template (scripts/pct-standin/build-template), provisioned by the SAME
# playbook as every other install (playbooks/provision.yml: roles base, firewall,
# whisper_appliance) in a build CT made with the pct stand-in, then stripped of everything that
# belongs to one instance (scripts/image/strip-rootfs.sh) and packed with numeric owners.
# Nothing secret is baked in: each CT made from the image creates its own certificates, admin
# password, secret key, SSH host keys and machine-id at its first boot.
# Skipped when the output exists and its inputs (wheelhouse, roles, playbooks, these scripts)
# have the same digest as at the last build (IMAGE_FORCE=1 rebuilds). Needs root.
#   scripts/image/build.sh [OUT.tar.zst]
#   IMAGE_BUILD_VMID (9110)  IMAGE_BUILD_IP (10.77.77.110)  IMAGE_ZSTD_LEVEL (6)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STANDIN=$ROOT/scripts/pct-standin
# shellcheck source=scripts/pct-standin/lib.sh
. "$STANDIN/lib.sh"
VMID=${IMAGE_BUILD_VMID:-9110}
IP=${IMAGE_BUILD_IP:-10.77.77.110}
GATEWAY=${STANDIN_GATEWAY:-10.77.77.1}
ZSTD_LEVEL=${IMAGE_ZSTD_LEVEL:-6}
BASE_NAME=debian-12-standard_12.0-standin_amd64.tar.zst
BASE=$ROOT/.cache/lxc/$BASE_NAME
WORK=$ROOT/.cache/image
LOG=$ROOT/tests/artifacts/image-build.log

msg() { printf '\033[1;34m==>\033[0m [%4d s] %s\n' "$SECONDS" "$*"; }
fail() { printf 'image: %s\n' "$*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || fail "needs root (LXC container, bridge, NAT)"
[ -f dist/wheelhouse/VERSION ] || fail "no wheelhouse (dist/wheelhouse/VERSION): run \`make dist\`"
[ -f collections/.installed ] || fail "Ansible collections missing: run \`make collections\`"
[ -x .venv/bin/ansible-playbook ] || fail "no .venv/bin/ansible-playbook: run \`make setup\`"
version=$(cat dist/wheelhouse/VERSION)
[[ $version =~ ^[0-9A-Za-z.+_-]+$ ]] || fail "dist/wheelhouse/VERSION is not a version: '$version'"
OUT=${1:-dist/image/whisper-appliance-$version-debian-12_amd64.tar.zst}
[[ $OUT == *.tar.zst ]] || fail "the output must end in .tar.zst (Proxmox template), got '$OUT'"
[[ $VMID =~ ^[0-9]+$ ]] || fail "IMAGE_BUILD_VMID must be a number, got '$VMID'"
[[ $ZSTD_LEVEL =~ ^[0-9]+$ ]] || fail "IMAGE_ZSTD_LEVEL must be a number, got '$ZSTD_LEVEL'"
mkdir -p "$(dirname "$OUT")" "$WORK" "$(dirname "$LOG")"
OUT=$(readlink -f "$OUT")
STAMP=$(dirname "$OUT")/.$(basename "$OUT").inputs

# One build at a time (make image and the tests that consume the image may overlap).
exec 9>"$WORK/.build.lock"
flock 9

# A private copy of the wheelhouse (hard links): a concurrent `make dist` cannot change it
# under the build, and the digest below describes exactly what was installed.
rm -rf "$WORK/wheelhouse"
cp -al "$ROOT/dist/wheelhouse" "$WORK/wheelhouse"

# What the image is made of, one digest per part (the stamp says which part changed). The
# appliance wheel is hashed by its RECORD (the hashes of the files inside): rebuilding the same
# code gives a wheel with new timestamps, not a new image.
files_digest() { git ls-files -z "$@" | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1; }
inputs() {
  echo "wheelhouse $({
    grep -v ' whisper_appliance-' "$WORK/wheelhouse/SHA256SUMS"
    python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); sys.stdout.buffer.write(
      b"".join(z.read(n) for n in z.namelist() if n.endswith(".dist-info/RECORD")))' \
      "$WORK"/wheelhouse/whisper_appliance-*.whl
    cat "$WORK/wheelhouse/VERSION" "$WORK/wheelhouse/PYTHON"
  } | sha256sum | cut -d' ' -f1)"
  echo "ansible $(files_digest roles playbooks ansible.cfg)"
  echo "scripts $(files_digest scripts/image scripts/pct-standin/build-template)"
  echo "zstd $ZSTD_LEVEL"
}
inputs >"$WORK/inputs"
if [ "${IMAGE_FORCE:-0}" != 1 ] && [ -f "$OUT" ] && [ -f "$OUT.sha256" ] &&
  cmp -s "$STAMP" "$WORK/inputs"; then
  msg "$OUT is up to date ($(du -h "$OUT" | cut -f1))"
  exit 0
fi
if [ -f "$STAMP" ] && [ -f "$OUT" ]; then
  msg "rebuilding: changed since the last build: $(diff "$STAMP" "$WORK/inputs" |
    sed -n 's/^> \([a-z]*\) .*/\1/p' | paste -sd' ')"
fi

pct() { "$STANDIN/pct" "$@"; }
destroy_build_ct() {
  if [ -f "$(conf_file "$VMID")" ]; then
    pct stop "$VMID" >/dev/null 2>&1 || true
    pct destroy "$VMID"
  fi
}
cleanup() {
  local rc=$?
  destroy_build_ct || true
  "$STANDIN/standin-net" down >/dev/null || true
  rm -rf "$WORK/ssh" "$WORK/wheelhouse" "$WORK/inventory.yml" "$OUT.part" "$OUT.sha256.part"
  if [ "$rc" != 0 ]; then
    echo "===== image build FAILED: last 80 lines of $LOG =====" >&2
    tail -n 80 "$LOG" >&2 || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
: >"$LOG"

msg "base template (cached in .cache/lxc)"
grep -qx 'root:100000:65536' /etc/subuid || echo 'root:100000:65536' >>/etc/subuid
grep -qx 'root:100000:65536' /etc/subgid || echo 'root:100000:65536' >>/etc/subgid
"$STANDIN/build-template" "$BASE" >>"$LOG" 2>&1
ensure_dirs
# Always the base that was just checked, under a name of its own: never a stale copy.
install -m 0644 "$BASE" "$VZTMPL/.image-build-base.tar.zst"
"$STANDIN/standin-net" up >>"$LOG"

msg "build CT $VMID ($IP): unprivileged, like the CTs made from the image"
destroy_build_ct  # a leftover of an interrupted build
mkdir -p "$WORK/ssh"
ssh-keygen -q -t ed25519 -N "" -C image-build -f "$WORK/ssh/id_ed25519"
pct create "$VMID" "local:vztmpl/.image-build-base.tar.zst" --hostname whisper-image-build \
  --cores 2 --memory 3072 --swap 512 --unprivileged 1 --features nesting=1 \
  --net0 "name=eth0,bridge=vmbr0,ip=$IP/24,gw=$GATEWAY" \
  --ssh-public-keys "$WORK/ssh/id_ed25519.pub" --start 1 >>"$LOG" 2>&1

msg "provisioning with playbooks/provision.yml (log: $LOG)"
# MemoryMax=infinity: the role would size it from the build machine's CPU count; in the image
# the CT's own memory (pct --memory) is the limit, and WORKER_PROCESSES follows its cores.
cat >"$WORK/inventory.yml" <<YAML
all:
  children:
    whisper_appliance:
      hosts:
        whisper-image-build:
          ansible_host: $IP
          ansible_user: root
          ansible_ssh_private_key_file: $WORK/ssh/id_ed25519
          ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
          whisper_appliance_wheelhouse: $WORK/wheelhouse
          whisper_appliance_memory_max: infinity
YAML
ANSIBLE_CONFIG=$ROOT/ansible.cfg ANSIBLE_FORCE_COLOR=false \
  ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks \
  .venv/bin/ansible-playbook -i "$WORK/inventory.yml" playbooks/provision.yml >>"$LOG" 2>&1

msg "stopping the build CT and stripping what belongs to one instance"
pct shutdown "$VMID" >>"$LOG" 2>&1
rootfs=$LXCPATH/$VMID/rootfs
# Inside the CT's user namespace the files are root's again: what the strip step writes and
# what tar records get the CT's own ids (0 = root), as a template must have.
in_ct_userns() { lxc-usernsexec -m "b:0:$SUBID_BASE:$SUBID_COUNT" -- "$@"; }
in_ct_userns bash "$ROOT/scripts/image/strip-rootfs.sh" "$rootfs" "$BASE" >>"$LOG" 2>&1
stray=$(find "$rootfs" -xdev \( -uid -"$SUBID_BASE" -o -gid -"$SUBID_BASE" \) -print -quit)
[ -z "$stray" ] || fail "$stray is owned by a host id: it would land in the image as 'nobody'"

msg "packing $(basename "$OUT") (zstd -$ZSTD_LEVEL)"
in_ct_userns tar --numeric-owner --sort=name --one-file-system -C "$rootfs" \
  --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' --exclude='./run/*' \
  --exclude='./tmp/*' --exclude='./var/tmp/*' -cf - . |
  zstd -q -T0 "-$ZSTD_LEVEL" >"$OUT.part"
# The checksum first, then both renames back to back: a reader never sees a mismatched pair.
sum=$(sha256sum "$OUT.part" | cut -d' ' -f1)
printf '%s  %s\n' "$sum" "$(basename "$OUT")" >"$OUT.sha256.part"
mv "$OUT.part" "$OUT"
mv "$OUT.sha256.part" "$OUT.sha256"
cp "$WORK/inputs" "$STAMP"
msg "built $OUT ($(du -h "$OUT" | cut -f1)) in $SECONDS s"
