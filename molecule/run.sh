#!/usr/bin/env bash
# Runs the molecule scenarios side by side (2 cores: much of a run is waiting on apt, SSH and
# service start-up), each logging to tests/artifacts/molecule-<scenario>.log; prints each
# scenario's result and wall time, and the log of any that failed. Exit status: 0 if all passed.
#   molecule/run.sh [SCENARIO...]   (default: every directory under molecule/ with molecule.yml)
#   MOLECULE_ANSIBLE_ARGS="-e var=value"  extra ansible-playbook arguments for every scenario
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="$PWD/.venv/bin:$PATH"   # molecule runs ansible-config, ansible-playbook from here
MOLECULE=${MOLECULE:-.venv/bin/molecule}
LOGS=tests/artifacts
mkdir -p "$LOGS" molecule/.cache/ssh

if [ $# -gt 0 ]; then
  scenarios=("$@")
else
  mapfile -t scenarios < <(find molecule -mindepth 2 -maxdepth 2 -name molecule.yml -printf '%h\n' | xargs -n1 basename | sort)
fi

# What the scenarios share is made once, up front: the test key and the cached CT template.
[ -f molecule/.cache/ssh/id_ed25519 ] ||
  ssh-keygen -q -t ed25519 -N "" -C molecule -f molecule/.cache/ssh/id_ed25519
scripts/pct-standin/build-template .cache/lxc/debian-12-standard_12.0-standin_amd64.tar.zst
# The bridge is shared: the scenarios' destroy steps leave it up, it goes down when all ended.
export PCT_STANDIN_KEEP_NET=1
scripts/pct-standin/standin-net up
trap 'scripts/pct-standin/standin-net down' EXIT
read -r -a extra <<<"${MOLECULE_ANSIBLE_ARGS:-}"

declare -A pids start
# Interrupted (CI timeout, Ctrl-C): stop the runs, then destroy what they created.
on_signal() {
  trap - INT TERM
  for s in "${!pids[@]}"; do kill -- "-${pids[$s]}" 2>/dev/null || true; done
  wait || true
  for s in "${!pids[@]}"; do "$MOLECULE" destroy -s "$s" >>"$LOGS/molecule-$s.log" 2>&1 || true; done
  exit 130
}
trap on_signal INT TERM
for s in "${scenarios[@]}"; do
  start[$s]=$SECONDS
  # Own session and process group: an interrupt stops molecule and its ansible-playbook.
  setsid "$MOLECULE" test -s "$s" -- "${extra[@]}" >"$LOGS/molecule-$s.log" 2>&1 &
  pids[$s]=$!
  echo "molecule $s: started (log: $LOGS/molecule-$s.log)"
done

failed=()
for s in "${scenarios[@]}"; do
  if wait "${pids[$s]}"; then
    echo "molecule $s: passed in $((SECONDS - start[$s])) s"
  else
    echo "molecule $s: FAILED after $((SECONDS - start[$s])) s"
    failed+=("$s")
  fi
done
for s in "${failed[@]}"; do
  echo "===== molecule $s: last 150 lines of $LOGS/molecule-$s.log ====="
  tail -n 150 "$LOGS/molecule-$s.log"
done
echo "molecule: ${#scenarios[@]} scenario(s), ${#failed[@]} failed, wall time ${SECONDS} s"
[ ${#failed[@]} -eq 0 ]
