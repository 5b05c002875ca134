# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts sourcing this
# Shared state and helpers of the pct/pveam stand-in (sourced by pct, pveam, standin-net).
#
# The stand-in keeps Proxmox-style config files (what `pct config` prints) next to real LXC
# containers in its own lxcpath, so it never touches containers made with plain lxc-create.

PCT_STANDIN_ROOT=${PCT_STANDIN_ROOT:-/var/lib/pct-standin}
PCT_STANDIN_CATALOG=${PCT_STANDIN_CATALOG:-$PCT_STANDIN_ROOT/catalog}  # what `pveam available` offers
LXCPATH=$PCT_STANDIN_ROOT/lxc
PVECONF=$PCT_STANDIN_ROOT/pve/lxc
VZTMPL=$PCT_STANDIN_ROOT/template/cache   # storage "local", content vztmpl
SUBID_BASE=100000                          # Proxmox maps unprivileged CTs to 100000:65536
SUBID_COUNT=65536

die() { printf '%s\n' "$*" >&2; exit 2; }

ensure_dirs() { mkdir -p "$LXCPATH" "$PVECONF" "$VZTMPL" "$PCT_STANDIN_CATALOG"; }

# Proxmox-style "key: value" config file of a CT.
conf_file() { printf '%s/%s.conf' "$PVECONF" "$1"; }
conf_get() {  # conf_get VMID KEY
  sed -n "s/^$2: //p" "$(conf_file "$1")" | head -n1
}
conf_set() {  # conf_set VMID KEY VALUE
  local f; f=$(conf_file "$1")
  if grep -q "^$2: " "$f"; then
    local tmp; tmp=$(mktemp)
    awk -v k="$2" -v v="$3" 'index($0, k ": ") == 1 { print k ": " v; next } { print }' "$f" >"$tmp"
    cat "$tmp" >"$f"; rm -f "$tmp"
  else
    printf '%s: %s\n' "$2" "$3" >>"$f"
  fi
}
require_ct() {
  [[ $1 =~ ^[0-9]+$ ]] || die "400 Parameter verification failed. vmid: invalid format"
  [ -f "$(conf_file "$1")" ] || die "Configuration file 'nodes/standin/lxc/$1.conf' does not exist"
}
ct_state() { lxc-info -P "$LXCPATH" -n "$1" -sH 2>/dev/null || echo STOPPED; }

# "name=eth0,bridge=vmbr0,ip=dhcp" -> value of one key
kv_get() {  # kv_get STRING KEY
  local IFS=, part
  for part in $1; do
    [ "${part%%=*}" = "$2" ] && { printf '%s' "${part#*=}"; return 0; }
  done
  return 0
}
