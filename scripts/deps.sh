#!/usr/bin/env bash
# Installs what `make run` / `make test` need and are missing, from Debian's
# packages: redis-server and redis-tools (redis-cli). Pass extra package
# names as arguments (e.g. wrk webdis for the benchmarks).
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
for pkg in "$@"; do
  case "$pkg" in
    wrk) command -v wrk >/dev/null 2>&1 || need+=(wrk) ;;
    webdis) command -v webdis >/dev/null 2>&1 || need+=(webdis) ;;
    *) dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg") ;;
  esac
done

if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo not found; install Rust >= 1.88 with rustup (https://rustup.rs) and retry" >&2
  exit 1
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y -q "${need[@]}" >/dev/null; then
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q "${need[@]}" >/dev/null
fi
