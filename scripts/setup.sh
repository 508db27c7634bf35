#!/usr/bin/env bash
# Installs everything stampline needs on a Debian machine: the system packages (through
# apt-get, when missing) and a virtual environment with the Python dependencies.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# command -> Debian package that provides it
declare -A NEEDED=(
  [softhsm2-util]=softhsm2
  [pkcs11-tool]=opensc
  [mosquitto]=mosquitto
  [mosquitto_pub]=mosquitto-clients
  [openssl]=openssl
)

missing=()
for cmd in "${!NEEDED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${NEEDED[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; else
    echo "setup: the system packages $pkgs are missing and this user cannot install them; run: sudo apt-get install -y $pkgs" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: the system packages $pkgs are missing and this machine has no apt-get; install them with its package manager." >&2
    exit 1
  fi
  echo "setup: installing system packages: $pkgs"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: stampline needs Python 3.11 or newer; $("$PYTHON" --version 2>&1) found." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing python3-venv"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    "$PYTHON" -m venv "$VENV" || { echo "setup: could not create a virtual environment; install python3-venv." >&2; exit 1; }
  fi
fi
stamp="$VENV/.setup-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python dependencies into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
