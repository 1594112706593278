#!/usr/bin/env bash
# Installs the system packages RuntimeAI's build needs on Debian/Ubuntu, if they are missing.
#   g++            RocksDB is C++ (built by the rocksdb crate)
#   libclang-dev   bindgen generates RocksDB's Rust bindings through libclang
#   pkg-config     locating system libraries
#   libvirt-dev    the VM backend links libvirt's client library (the `virt` crate)
#   python3-venv   a private environment for schemathesis, the API fuzzer the tests run
# protoc is not needed: the .proto files are compiled in pure Rust (protox).
set -euo pipefail

# fonts-dejavu-core: the font runtimeai-chaos and runtimeai-bench draw with; util-linux: unshare
# and nsenter for the chaos disk faults; etcd-server: the yardstick runtimeai-bench measures
# against (Debian starts nothing here: the bench runs its own members).
packages=(g++ libclang-dev pkg-config libvirt-dev python3 python3-venv fonts-dejavu-core util-linux etcd-server)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "error: missing packages (${missing[*]}) and no apt-get to install them; install them by hand" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "error: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "installing system packages: ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
