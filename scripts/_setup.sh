# Shared by scripts/run, scripts/test, scripts/check and scripts/bench: make .venv and the
# system packages ready. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf '%s\n' "$*" >&2; }

pick_python() {
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  say "error: Python 3.11 or newer is needed (Debian: apt-get install python3 python3-venv)"
  exit 1
}

# ensure_venv EXTRA: create .venv and install the package (with [EXTRA]) when pyproject changed.
# EXTRA may name several, comma-separated ("dev,langchain").
ensure_venv() {
  local extra="$1" stamp=".venv/.installed-${1//,/-}"
  if [ ! -x .venv/bin/python ]; then
    "$(pick_python)" -m venv .venv || {
      say "error: could not create .venv (Debian: apt-get install python3-venv)"; exit 1; }
  fi
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing memory-worker${extra:+[$extra]} into .venv ..."
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra:+[$extra]}"
    echo "$want" > "$stamp"
  fi
}

# ensure_apt PROGRAM PACKAGE...: install with apt-get when missing and root; else say how.
ensure_apt() {
  local program="$1"; shift
  command -v "$program" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing $* with apt-get ..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    command -v "$program" >/dev/null && return 0
  fi
  say "error: '$program' is missing; install it first: sudo apt-get install $*"
  return 1
}

port_open() {  # port_open HOST PORT
  .venv/bin/python - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
PY
}

free_port() {  # a TCP port nothing listens on now, below the kernel's ephemeral range
  # (a client retrying a stopped broker's port in that range can be given it as its own
  # local port and connect to itself, holding it: the broker's restart finds it in use)
  .venv/bin/python - <<'PY'
import random, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
while True:
    port = random.randrange(10000, max(low, 11000))
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
PY
}
