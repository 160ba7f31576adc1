#!/bin/sh
# The whole set-up on a fresh Debian 12, as root or as a user with sudo: update the package lists,
# install what the build, its tests and the quick start need, fetch jemalloc's source (once, into
# third_party/), build everything, and run the quick start (build/kvpager-ab on its synthetic trace).
#   tools/setup.sh            all of it
#   tools/setup.sh --no-run   all but the quick start
set -eu
cd "$(dirname "$0")/.."

# The build: a C toolchain, libnuma, liburing, bzip2 for jemalloc's tarball. The tests: Criterion,
# binutils' nm and readelf, and libjemalloc2, which the plugin test preloads as a host's own allocator.
# The Python binding's suites: numpy and pytest. The remote tier: hiredis, and the Redis server and its
# redis-cli, which its tests start on loopback ports.
PACKAGES="build-essential binutils bzip2 pkg-config libnuma-dev liburing-dev libcriterion-dev libjemalloc2 \
	libhiredis-dev redis-server redis-tools python3-numpy python3-pytest"

run_quick_start=1
case "${1:-}" in
"") ;;
--no-run) run_quick_start=0 ;;
*) echo "usage: tools/setup.sh [--no-run]" >&2; exit 2 ;;
esac

if [ "$(id -u)" -eq 0 ]; then
	as_root=""
elif command -v sudo >/dev/null; then
	as_root="sudo"
else
	echo "tools/setup.sh: installing packages needs root: run it as root, or install sudo" >&2
	exit 1
fi
command -v apt-get >/dev/null || {
	echo "tools/setup.sh: no apt-get; on another system install the equivalents of: $PACKAGES" >&2
	exit 1
}

echo "== apt-get update, then install: $PACKAGES"
# A fresh image has empty package lists: nothing installs before an update.
$as_root apt-get update -q
# shellcheck disable=SC2086 # one word per package
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES

echo "== jemalloc's source"
tools/jemalloc.sh fetch

echo "== make (jemalloc, the library, tools, tests, benchmarks)"
make -j"$(nproc)" all

if [ "$run_quick_start" -eq 1 ]; then
	echo "== quick start: build/kvpager-ab"
	build/kvpager-ab
fi
