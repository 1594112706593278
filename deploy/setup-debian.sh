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
# and nsenter for the chaos disk faults, mount for sandboxes' layers; etcd-server: the yardstick
# runtimeai-bench measures against (Debian starts nothing here: the bench runs its own members).
# Sandboxes: crun (the OCI runtime that runs them), tini (their PID 1, tini-static), busybox-static
# (the default image), e2fsprogs (each sandbox's writable layer is an ext4 file system of its own),
# skopeo and umoci (pull images from registries and unpack them); docker-registry: the registry the
# tests push images to and pull them from (Debian starts nothing here: the tests run their own).
# VMs: genisoimage (a VM's cloud-init NoCloud seed is an ISO 9660 image labelled cidata).
# npm (with Node.js, unless the machine has its own): the MCP TypeScript SDK, a client the tests use.
# haproxy and wrk: runtimeai-bench measures both systems through a load balancer with a standard
# load generator; prometheus: the tests scrape /metrics with it (Debian starts none of them here).
packages=(g++ libclang-dev pkg-config libvirt-dev python3 python3-venv fonts-dejavu-core util-linux etcd-server
  crun tini busybox-static e2fsprogs skopeo umoci docker-registry genisoimage haproxy wrk prometheus)
command -v npm >/dev/null || packages+=(npm)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

# crun refuses a hybrid cgroup layout whose unified (v2) hierarchy holds controllers beside the v1
# hierarchies (some VMs put hugetlb there). As root, each such controller gets a v1 hierarchy of
# its own, which moves it out of the unified one (nothing uses it there: no group enables it).
move_unified_controllers() {
  local unified=/sys/fs/cgroup/unified/cgroup.controllers
  [ -r "$unified" ] && [ -d /sys/fs/cgroup/memory ] && [ "$(id -u)" -eq 0 ] || return 0
  for controller in $(cat "$unified"); do
    echo "moving the $controller cgroup controller to a v1 hierarchy, so that crun can run sandboxes" >&2
    mkdir -p "/sys/fs/cgroup/$controller"
    mount -t cgroup -o "$controller" cgroup "/sys/fs/cgroup/$controller" \
      || echo "warning: could not move $controller; sandboxes will not start here" >&2
  done
}

install_missing() {
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
}

[ ${#missing[@]} -eq 0 ] || install_missing
move_unified_controllers
