#!/usr/bin/env bash
# Removes from a provisioned, stopped CT's root filesystem everything that belongs to that one
# instance, so that two CTs made from the image share no secret and no identity. What is
# removed is recreated at the first boot of every new CT:
#   - DATA_DIR (database, CA + server certificate and keys, admin password, secret key): by the
#     appliance at its first start, the certificate for the CT's own names and addresses;
#   - SSH host keys: by `pct create` on Proxmox, else by ssh-host-keys.service (ssh-keygen -A);
#   - machine-id: by systemd (an empty /etc/machine-id means "first boot");
#   - hostname, hosts, resolv.conf, network/interfaces: by `pct create` from the CT's options.
# Runs as root inside the CT's user namespace (build.sh), so new files get the CT's ids.
#   strip-rootfs.sh ROOTFS
set -euo pipefail
root=${1:?usage: strip-rootfs.sh ROOTFS}
[ -x "$root/usr/bin/systemctl" ] && [ -d "$root/etc/ssh" ] || {
  echo "$root does not look like a Debian root filesystem" >&2; exit 2; }
data_dir=/var/lib/whisper-appliance
[ -d "$root$data_dir" ] || { echo "$root$data_dir missing: not provisioned?" >&2; exit 2; }
here=$(dirname "$(readlink -f "$0")")

empty_dir() { [ ! -d "$1" ] || find "$1" -mindepth 1 -delete; }
write() {  # write PATH MODE < content
  rm -f "$root$1"
  cat >"$root$1"
  chmod "$2" "$root$1"
}

echo "appliance data: $(find "$root$data_dir" -mindepth 1 -maxdepth 1 -printf '%f ')"
empty_dir "$root$data_dir"

echo "identity: SSH host keys, machine-id, build key, hostname, random seed"
rm -f "$root"/etc/ssh/ssh_host_*
: >"$root/etc/machine-id"
chmod 0444 "$root/etc/machine-id"
[ -L "$root/var/lib/dbus/machine-id" ] || rm -f "$root/var/lib/dbus/machine-id"
rm -f "$root/root/.ssh/authorized_keys" "$root/etc/hostname"
rm -f "$root/var/lib/systemd/random-seed" "$root/var/lib/systemd/credential.secret"
rm -rf "$root/var/lib/systemd/timesync/clock" "$root"/var/lib/dhcp/*.leases

echo "files pct writes at create: hosts, resolv.conf, network/interfaces"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' | write /etc/hosts 0644
: | write /etc/resolv.conf 0644
printf '%s\n' '# interfaces(5) file used by ifup(8) and ifdown(8)' \
  '# Include files from /etc/network/interfaces.d:' 'source /etc/network/interfaces.d/*' \
  '' 'auto lo' 'iface lo inet loopback' | write /etc/network/interfaces 0644

echo "caches, logs, history: apt lists and archives, journal, the build's Ansible and shell"
empty_dir "$root/var/lib/apt/lists"
mkdir -p "$root/var/lib/apt/lists/partial"
rm -f "$root"/var/cache/apt/*.bin
find "$root/var/cache/apt/archives" -name '*.deb' -delete
empty_dir "$root/var/log/journal"
find "$root/var/log" -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \) -delete
find "$root/var/log" -type f -exec truncate -s 0 {} +
rm -rf "$root/root/.ansible" "$root/root/.cache" "$root"/root/.*_history "$root/root/.lesshst"
empty_dir "$root/tmp"
empty_dir "$root/var/tmp"

echo "first boot: ssh-host-keys.service"
install -m 0644 "$here/ssh-host-keys.service" "$root/etc/systemd/system/ssh-host-keys.service"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sfn /etc/systemd/system/ssh-host-keys.service \
  "$root/etc/systemd/system/multi-user.target.wants/ssh-host-keys.service"
