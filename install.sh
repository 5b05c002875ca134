#!/usr/bin/env bash
# Whisper appliance — installer for a Proxmox VE host (README.md, "Install on Proxmox (one line)").
# Creates an LXC container from the appliance's CT template (downloaded from the pinned release
# and checked against its SHA-256), starts it, waits until it is healthy and prints the URL, where
# the admin password is and the CA certificate link. Run it again: it finds the container and
# only starts it / applies var_model. If anything fails after the container was created, the
# half-made container is removed again.
#
#   bash -c "$(curl -fsSL <release URL>/install.sh)"                  # asks (whiptail)
#   var_ram=4096 var_net=192.168.1.50/24 var_gateway=192.168.1.1 bash install.sh --unattended
#
# Settings, as environment variables (community-scripts style), with their defaults:
#   var_ctid (next free ID)   var_hostname (whisper)   var_cpu (2)   var_ram (3072 MiB)
#   var_swap (512 MiB)   var_disk (8 GiB)   var_storage (local-lvm, else the first storage for CT
#   disks)   var_template_storage (local)   var_bridge (vmbr0)   var_net (dhcp | IPv4/prefix)
#   var_gateway (none)   var_model (the image's default, tiny.en)   var_unprivileged (1)
#   var_health_timeout (300 s)   var_release_url (this release's download URL)
#   var_image (a template file already here, for air-gapped hosts)   var_image_sha256 (instead of
#   the pinned checksum)   var_unattended (1: no questions; also --unattended, or no terminal)
# Exit status: 0 installed or already there; 1 failed (nothing left behind); 2 refused before
# anything was changed (a bad setting, not root, not a Proxmox VE host, checksum not pinned).
set -euo pipefail

# The release this installer installs. `make installer` stamps both into dist/install.sh, the
# copy published with the release; this development copy needs var_image_sha256.
RELEASE_VERSION="0.1.0"
RELEASE_SHA256="unreleased"
RELEASE_URL="https://github.com/whisper-appliance/whisper-appliance/releases/download/v$RELEASE_VERSION"

APP_TAG=whisper-appliance
SERVICE=whisper-appliance
PASSWORD_FILE=/var/lib/whisper-appliance/admin-password.txt
ENV_FILE=/etc/whisper-appliance/env
HTTPS_PORT=5001
# appliance/core/model_manager.py CATALOGUE (tests/install keeps the two equal)
MODELS=(tiny.en tiny base.en base small.en small medium.en medium large-v3 large-v3-turbo
  distil-small.en distil-medium.en distil-large-v3)

if [ -t 2 ]; then C_OK=$'\e[32m' C_ERR=$'\e[31m' C_INFO=$'\e[36m' C_OFF=$'\e[0m'
else C_OK="" C_ERR="" C_INFO="" C_OFF=""; fi
msg_info() { printf ' %s-%s %s\n' "$C_INFO" "$C_OFF" "$*"; }
msg_ok() { printf ' %s✓%s %s\n' "$C_OK" "$C_OFF" "$*"; }
msg_error() { printf ' %s✗%s %s\n' "$C_ERR" "$C_OFF" "$*" >&2; }
refuse() { msg_error "$*"; msg_error "nothing was changed"; exit 2; }
fail() { msg_error "$*"; exit 1; }

usage() {  # the header above; run as `bash -c "$(curl ...)"` there is no file to read
  if [ -f "$0" ]; then sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
  else echo "Whisper appliance $RELEASE_VERSION installer: README.md, \"Install on Proxmox\""; fi
}

# --- settings ----------------------------------------------------------------------------------
case ${var_unattended:-0} in
  1|yes|true) UNATTENDED=1 ;;
  0|no|false) UNATTENDED=0 ;;
  *) refuse "var_unattended must be 0 or 1, got '$var_unattended'" ;;
esac
for arg in "$@"; do
  case $arg in
    --unattended) UNATTENDED=1 ;;
    -h|--help) usage; exit 0 ;;
    *) refuse "unknown argument '$arg' (try --help)" ;;
  esac
done
[ -t 0 ] || UNATTENDED=1   # piped, cron, CI: nobody to ask

CTID=${var_ctid:-}
CT_HOSTNAME=${var_hostname:-whisper}
CPU=${var_cpu:-2}
RAM=${var_ram:-3072}
SWAP=${var_swap:-512}
DISK=${var_disk:-8}
STORAGE=${var_storage:-}
TEMPLATE_STORAGE=${var_template_storage:-local}
BRIDGE=${var_bridge:-vmbr0}
NET=${var_net:-dhcp}
GATEWAY=${var_gateway:-}
MODEL=${var_model:-}
UNPRIVILEGED=${var_unprivileged:-1}
HEALTH_TIMEOUT=${var_health_timeout:-300}
BASE_URL=${var_release_url:-$RELEASE_URL}
IMAGE=${var_image:-}
IMAGE_SHA256=${var_image_sha256:-$RELEASE_SHA256}

# --- checks that change nothing ----------------------------------------------------------------
check_host() {
  [ "$(id -u)" = 0 ] || refuse "run this as root on the Proxmox VE host"
  local tool
  for tool in pveversion pct pvesm; do
    command -v "$tool" >/dev/null || refuse "this is not a Proxmox VE host ($tool not found)"
  done
  for tool in curl sha256sum; do
    command -v "$tool" >/dev/null || refuse "$tool is needed: apt-get install $tool"
  done
}

is_uint() { [[ $1 =~ ^[0-9]{1,9}$ ]]; }
in_range() {  # in_range NAME VALUE MIN MAX UNIT
  is_uint "$2" && [ "$((10#$2))" -ge "$3" ] && [ "$((10#$2))" -le "$4" ] ||
    refuse "$1 must be a whole number from $3 to $4$5, got '$2'"
}
is_ipv4() {
  local IFS=. o octets
  [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
  read -r -a octets <<<"$1"
  for o in "${octets[@]}"; do [ "$((10#$o))" -le 255 ] || return 1; done
}
is_cidr() {
  [[ $1 == */* ]] && is_ipv4 "${1%/*}" && is_uint "${1#*/}" && [ "$((10#${1#*/}))" -ge 1 ] &&
    [ "$((10#${1#*/}))" -le 32 ]
}
is_hostname() {  # RFC 1123: labels of letters, digits and inner hyphens, 253 characters at most
  local label
  [ "${#1}" -le 253 ] && [[ $1 =~ ^[A-Za-z0-9.-]+$ ]] && [[ $1 != *..* ]] || return 1
  local IFS=.
  for label in $1; do
    [[ $label =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$ ]] || return 1
  done
  [[ $1 != .* && $1 != *. ]]
}
storages_for() { pvesm status --content "$1" 2>/dev/null | awk 'NR > 1 { print $1 }'; }
is_storage() {  # is_storage NAME CONTENT: a storage ID of this host that holds CONTENT
  [[ $1 =~ ^[A-Za-z][A-Za-z0-9_.-]*$ ]] && storages_for "$2" | grep -xF -- "$1" >/dev/null
}

validate() {
  if [ -n "$CTID" ]; then in_range var_ctid "$CTID" 100 999999999 ""; CTID=$((10#$CTID)); fi
  is_hostname "$CT_HOSTNAME" ||
    refuse "var_hostname must be a host name (RFC 1123: letters, digits, inner '-', '.')," \
      "got '$CT_HOSTNAME'"
  in_range var_cpu "$CPU" 1 512 " cores"
  in_range var_ram "$RAM" 1024 4194304 " MiB"
  in_range var_swap "$SWAP" 0 4194304 " MiB"
  in_range var_disk "$DISK" 4 131072 " GiB"
  in_range var_health_timeout "$HEALTH_TIMEOUT" 1 86400 " s"
  [[ $UNPRIVILEGED =~ ^[01]$ ]] || refuse "var_unprivileged must be 0 or 1, got '$UNPRIVILEGED'"
  [[ $BRIDGE =~ ^[A-Za-z0-9_.-]{1,15}$ ]] ||
    refuse "var_bridge must be an interface name, got '$BRIDGE'"
  if [ "$NET" != dhcp ]; then
    is_cidr "$NET" ||
      refuse "var_net must be 'dhcp' or an IPv4 address with prefix (192.168.1.50/24), got '$NET'"
  fi
  if [ -n "$GATEWAY" ]; then
    is_ipv4 "$GATEWAY" || refuse "var_gateway must be an IPv4 address, got '$GATEWAY'"
    [ "$NET" != dhcp ] || refuse "var_gateway needs a static var_net (DHCP sets the gateway)"
  fi
  if [ -n "$MODEL" ] && ! printf '%s\n' "${MODELS[@]}" | grep -xF -- "$MODEL" >/dev/null; then
    refuse "var_model must be one of: ${MODELS[*]}; got '$MODEL'"
  fi
  [[ $BASE_URL =~ ^https?://[^[:space:]\"\'\\]+$ ]] ||
    refuse "var_release_url must be an http(s) URL, got '$BASE_URL'"
  if [ -n "$IMAGE" ]; then
    [ -f "$IMAGE" ] && [ -r "$IMAGE" ] || refuse "var_image: no readable file '$IMAGE'"
    [[ $(basename "$IMAGE") =~ ^[A-Za-z0-9._+-]+\.tar\.(zst|xz|gz)$ ]] ||
      refuse "var_image must be a CT template named like NAME.tar.zst, got '$IMAGE'"
  fi
  [[ $IMAGE_SHA256 =~ ^[0-9a-fA-F]{64}$ ]] || {
    [ -z "${var_image_sha256:-}" ] ||
      refuse "var_image_sha256 must be 64 hex digits, got '$IMAGE_SHA256'"
    refuse "this install.sh is not a release (no pinned checksum): use the install.sh published" \
      "with a release, or give var_image_sha256 (and var_image or var_release_url)"
  }
  IMAGE_SHA256=${IMAGE_SHA256,,}
  # What the host offers: storages, bridge.
  is_storage "$TEMPLATE_STORAGE" vztmpl ||
    refuse "var_template_storage '$TEMPLATE_STORAGE' is no storage for CT templates here" \
      "(these are: $(storages_for vztmpl | paste -sd' ' -))"
  if [ -z "$STORAGE" ]; then
    local rootdirs=()
    mapfile -t rootdirs < <(storages_for rootdir)
    STORAGE=${rootdirs[0]:-}
    [[ " ${rootdirs[*]} " != *" local-lvm "* ]] || STORAGE=local-lvm
    [ -n "$STORAGE" ] ||
      refuse "no storage here can hold CT disks (content rootdir): set var_storage"
  fi
  is_storage "$STORAGE" rootdir ||
    refuse "var_storage '$STORAGE' is no storage for CT disks here (these are:" \
      "$(storages_for rootdir | paste -sd' ' -))"
  ip link show "$BRIDGE" >/dev/null 2>&1 || refuse "var_bridge: no bridge '$BRIDGE' on this host"
}

# The appliance made by an earlier run: var_ctid if given, else a tagged CT with our host name.
has_tag() {
  pct config "$1" 2>/dev/null | sed -n 's/^tags: //p' | tr ';, ' '\n' | grep -xF -- "$APP_TAG" >/dev/null
}
ct_exists() { pct config "$1" >/dev/null 2>&1; }
find_existing() {
  local id name
  while read -r id name; do
    [ "$name" = "$CT_HOSTNAME" ] && has_tag "$id" && { echo "$id"; return 0; }
  done < <(pct list 2>/dev/null | awk 'NR > 1 { print $1, $NF }')
  return 0
}

# --- questions (interactive only) --------------------------------------------------------------
wt() {  # whiptail answers on stderr: swap it with stdout for $(...)
  whiptail --backtitle "Whisper appliance $RELEASE_VERSION" --title "Whisper appliance" "$@" \
    3>&1 1>&2 2>&3
}
ask() {  # ask VAR PROMPT: an input box prefilled with the current value
  local value
  value=$(wt --inputbox "$2" 9 70 "${!1}") || fail "cancelled: nothing was changed"
  printf -v "$1" '%s' "$value"
}
dialogs() {
  command -v whiptail >/dev/null ||
    refuse "whiptail is missing: apt-get install whiptail, or run with --unattended"
  local summary="CT $CTID '$CT_HOSTNAME': $CPU cores, $RAM MiB RAM, $DISK GiB disk"
  summary+=" on ${STORAGE:-local-lvm}, $BRIDGE $NET, model ${MODEL:-default (tiny.en)}"
  wt --yesno "$summary\n\nInstall with these settings?\n(No: change them)" 12 76 && return 0
  ask CTID "Container ID"
  ask CT_HOSTNAME "Host name"
  ask CPU "CPU cores"
  ask RAM "RAM (MiB)"
  ask DISK "Disk size (GiB)"
  ask STORAGE "Storage for the container's disk"
  ask BRIDGE "Network bridge"
  ask NET "IPv4 address with prefix (192.168.1.50/24), or dhcp"
  [ "$NET" = dhcp ] || ask GATEWAY "Gateway (empty: none)"
  local items=() m
  for m in "${MODELS[@]}"; do items+=("$m" ""); done
  MODEL=$(wt --menu "Speech model (bundled: tiny.en, base; others are downloaded)" 22 60 13 \
    --default-item "${MODEL:-tiny.en}" "${items[@]}") || fail "cancelled: nothing was changed"
}

# --- the template ------------------------------------------------------------------------------
PART=""
sha_of() { sha256sum "$1" | cut -d' ' -f1; }
fetch_template() {  # sets TEMPLATE (storage:vztmpl/NAME) to a verified file
  local name dest
  if [ -n "$IMAGE" ]; then name=$(basename "$IMAGE")
  else name="whisper-appliance-$RELEASE_VERSION-debian-12_amd64.tar.zst"; fi
  TEMPLATE="$TEMPLATE_STORAGE:vztmpl/$name"
  dest=$(pvesm path "$TEMPLATE") || fail "pvesm cannot place '$TEMPLATE'"
  if [ -f "$dest" ] && [ "$(sha_of "$dest")" = "$IMAGE_SHA256" ]; then
    msg_ok "template $name (already here, checksum verified)"; return 0
  fi
  mkdir -p "$(dirname "$dest")"
  PART="$dest.part.$$"
  if [ -n "$IMAGE" ]; then
    msg_info "checking $IMAGE"
    [ "$(sha_of "$IMAGE")" = "$IMAGE_SHA256" ] ||
      fail "checksum mismatch: $IMAGE is not the expected template (sha256 $IMAGE_SHA256): not used"
    cp -- "$IMAGE" "$PART"
  else
    msg_info "downloading $BASE_URL/$name"
    curl -fsSL --retry 3 --connect-timeout 20 -o "$PART" "$BASE_URL/$name" ||
      fail "download failed: $BASE_URL/$name"
  fi
  if [ "$(sha_of "$PART")" != "$IMAGE_SHA256" ]; then
    fail "checksum mismatch: $name is not the expected template (sha256 $IMAGE_SHA256): removed"
  fi
  mv -f -- "$PART" "$dest"; PART=""
  msg_ok "template $name (checksum verified)"
}

# --- the container -----------------------------------------------------------------------------
CREATED=""   # set when `pct create` is called (it may fail half-way): on failure the CT goes
cleanup() {
  local rc=$?
  [ -z "$PART" ] || rm -f -- "$PART"
  # has_tag: should pct create fail because another CT took the ID meanwhile, that one stays.
  if [ "$rc" -ne 0 ] && [ -n "$CREATED" ] && ct_exists "$CTID" && has_tag "$CTID"; then
    msg_error "installation failed: removing the half-created CT $CTID"
    pct exec "$CTID" -- journalctl -u "$SERVICE" -n 15 --no-pager >&2 2>/dev/null || true
    pct stop "$CTID" >/dev/null 2>&1 || true
    if pct destroy "$CTID" >/dev/null; then msg_ok "CT $CTID removed"
    else msg_error "could not remove CT $CTID: pct destroy $CTID"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

create_ct() {
  local net0="name=eth0,bridge=$BRIDGE,ip=$NET"
  [ -z "$GATEWAY" ] || net0+=",gw=$GATEWAY"
  msg_info "creating CT $CTID ($CT_HOSTNAME, $CPU cores, $RAM MiB, $DISK GiB on $STORAGE)"
  CREATED=1
  pct create "$CTID" "$TEMPLATE" --hostname "$CT_HOSTNAME" --cores "$CPU" --memory "$RAM" \
    --swap "$SWAP" --rootfs "$STORAGE:$DISK" --net0 "$net0" --unprivileged "$UNPRIVILEGED" \
    --features nesting=1 --onboot 1 --tags "$APP_TAG" --ostype debian --start 1 >/dev/null ||
    fail "pct create failed"
  msg_ok "CT $CTID created and started"
}

# Right after `pct start` the CT's systemd does not answer yet ("Failed to connect to bus").
DEADLINE=0   # the end of the wait for the CT (var_health_timeout), set when it was started
wait_systemd() {
  local state=""
  until [[ $state =~ ^(initializing|starting|running|degraded|maintenance)$ ]]; do
    [ "$SECONDS" -lt "$DEADLINE" ] || fail "systemd in CT $CTID does not answer"
    sleep 1
    state=$(pct exec "$CTID" -- systemctl is-system-running 2>/dev/null || true)
  done
}

set_model() {  # writes WHISPER_MODEL into the CT's env file and restarts the service on change
  [ -n "$MODEL" ] || return 0
  wait_systemd
  local current
  current=$(pct exec "$CTID" -- sed -n 's/^WHISPER_MODEL=//p' "$ENV_FILE") ||
    fail "CT $CTID has no $ENV_FILE: not a Whisper appliance template?"
  [ "$current" != "$MODEL" ] || return 0
  msg_info "model $MODEL (was ${current:-unset})"
  # shellcheck disable=SC2016  # $1, $2 belong to the CT's shell
  pct exec "$CTID" -- sh -c 'if grep -q "^WHISPER_MODEL=" "$1"
    then sed -i "s/^WHISPER_MODEL=.*/WHISPER_MODEL=$2/" "$1"; else echo "WHISPER_MODEL=$2" >>"$1"; fi' \
    sh "$ENV_FILE" "$MODEL" || fail "could not write $ENV_FILE in CT $CTID"
  pct exec "$CTID" -- systemctl restart "$SERVICE" || fail "could not restart $SERVICE in CT $CTID"
}

CT_IP=""
ct_ip() {  # the CT's IPv4 address: static from its config, else what DHCP gave eth0
  local ip
  ip=$(pct config "$CTID" | sed -n 's/^net0: .*ip=\([0-9.]*\)\/.*/\1/p')
  [ -n "$ip" ] || ip=$(pct exec "$CTID" -- ip -4 -o addr show dev eth0 scope global 2>/dev/null |
    awk '{ sub("/.*", "", $4); print $4; exit }')
  printf '%s' "$ip"
}
# Readiness as the service itself reports it: GET /health answers 200 once the model is loaded
# and the database writable. Asked inside the CT, so it works whatever the host's routing.
PROBE="import ssl, urllib.request as u
c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
u.urlopen('https://127.0.0.1:$HTTPS_PORT/health', context=c, timeout=5)"
wait_healthy() {
  msg_info "waiting for the appliance to become healthy (up to $HEALTH_TIMEOUT s)"
  until [ -n "$CT_IP" ] && pct exec "$CTID" -- python3 -c "$PROBE" >/dev/null 2>&1; do
    [ -n "$CT_IP" ] || CT_IP=$(ct_ip 2>/dev/null || true)
    [ "$SECONDS" -lt "$DEADLINE" ] ||
      fail "CT $CTID is not healthy after $HEALTH_TIMEOUT s" \
        "(https://127.0.0.1:$HTTPS_PORT/health in the CT${CT_IP:+, address $CT_IP})"
    sleep 3
  done
  msg_ok "healthy ($((SECONDS - DEADLINE + HEALTH_TIMEOUT)) s after the start)"
}

summary() {
  local pw="pct exec $CTID -- cat $PASSWORD_FILE"
  pct exec "$CTID" -- test -f "$PASSWORD_FILE" ||
    pw="(changed in the admin panel: $PASSWORD_FILE was removed then)"
  cat <<EOF

 Whisper appliance $RELEASE_VERSION is running in CT $CTID ($CT_HOSTNAME).
   URL:            https://$CT_IP:$HTTPS_PORT
   Admin password: $pw
   CA certificate: http://$CT_IP/ca.crt  (import it to trust the appliance's certificate)
EOF
}

main() {
  check_host
  if [ -z "$CTID" ]; then
    CTID=$(find_existing)
    [ -n "$CTID" ] || CTID=$(pvesh get /cluster/nextid) || refuse "pvesh get /cluster/nextid failed"
  fi
  # Questions only for a new CT: a re-run leaves an existing one as it is.
  [ "$UNATTENDED" = 1 ] || { ct_exists "$CTID" && has_tag "$CTID"; } || dialogs
  validate
  if ct_exists "$CTID"; then
    has_tag "$CTID" || refuse "CT $CTID exists and is not a Whisper appliance (no tag" \
      "'$APP_TAG'): choose another var_ctid"
    msg_ok "CT $CTID is already a Whisper appliance: not recreated (only var_model is applied)"
    CT_HOSTNAME=$(pct config "$CTID" | sed -n 's/^hostname: //p')
    if ! pct status "$CTID" | grep running >/dev/null; then
      pct start "$CTID" || fail "pct start $CTID failed"
      msg_ok "CT $CTID started"
    fi
  else
    fetch_template
    create_ct
  fi
  DEADLINE=$((SECONDS + HEALTH_TIMEOUT))
  set_model
  wait_healthy
  summary
}
main
