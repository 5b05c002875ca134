#!/usr/bin/env bash
# Proves the bootstrap's package list is complete: builds a minimal Debian 12 rootfs
# (mmdebstrap --variant=minbase) holding only the packages scripts/bootstrap.sh installs, then
# checks that every command and host file the Makefile, scripts and tests use resolves in it
# (scripts/check_commands.py). The rootfs is cached by its package list in .cache/fresh-rootfs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "check_fresh_machine.sh needs root (mmdebstrap, chroot)"; exit 1; }
packages=$(WITH_LXC=1 WITH_CONTAINER=1 WITH_BROWSER=1 bash scripts/bootstrap.sh --print-packages)
key=$(printf '%s\n' "$packages" | sha256sum | cut -c1-16)
rootfs=.cache/fresh-rootfs/$key
# An interrupted mmdebstrap can leave /proc mounted inside: unmount before removing anything.
unmount_all() {
  awk -v d="$PWD/.cache/fresh-rootfs/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m"; done
}
if [ ! -f "$rootfs/.complete" ]; then
  unmount_all
  rm -rf --one-file-system .cache/fresh-rootfs
  mkdir -p .cache/fresh-rootfs
  echo "==> minimal Debian 12 rootfs with: $(printf '%s\n' "$packages" | paste -sd' ')"
  # No mirror argument: mmdebstrap uses this host's apt sources, as bootstrap.sh's apt-get does.
  mmdebstrap --quiet --variant=minbase --include="$(printf '%s\n' "$packages" | paste -sd,)" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    bookworm "$rootfs.tmp"
  mv "$rootfs.tmp" "$rootfs"
  touch "$rootfs/.complete"
fi
.venv/bin/python scripts/check_commands.py check --root "$rootfs"
