#!/bin/sh
# jemalloc, built from Debian's own source package as a private copy inside libkvpager (pager/arena.c
# says why). The tarball is fetched once into third_party/ (git-ignored, kept by make clean); make only
# ever builds from it.
#   tools/jemalloc.sh fetch       download the source with apt-get (a private sources list: nothing of the
#                                 system's apt configuration or state changes) and check its SHA-256
#   tools/jemalloc.sh build DIR   check the tarball, unpack it into DIR (emptied first) and build
#                                 DIR/lib/libjemalloc_pic.a; JE_CC picks the compiler (default cc)
set -eu
cd "$(dirname "$0")/.."

version=5.3.0
tarball=jemalloc_$version.orig.tar.bz2

die() {
	echo "tools/jemalloc.sh: $*" >&2
	exit 1
}

# The SHA-256 recorded in third_party/jemalloc.sha256 is the one upstream published for its 5.3.0
# release; Debian's orig tarball is that file.
verify() {
	(cd third_party && sha256sum --quiet --strict -c jemalloc.sha256) ||
		die "third_party/$tarball does not match third_party/jemalloc.sha256; delete it and run tools/jemalloc.sh fetch"
}

# The Debian archive this machine already uses for its release (deb822 .sources or one-line .list files).
mirror_of() {
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk -v want="$1" 'BEGIN { RS = ""; FS = "\n" }
		{
			uri = ""; hit = 0; deb = 0
			for (i = 1; i <= NF; i++) {
				line = $i
				if (line ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", line); split(line, u, /[ \t]+/); uri = u[1] }
				if (line ~ /^Suites:/) { n = split(line, w, /[ \t]+/); for (j = 2; j <= n; j++) if (w[j] == want) hit = 1 }
				if (line ~ /^Types:/ && line ~ /[ \t]deb([ \t]|$)/) deb = 1
			}
			if (hit && deb && uri != "") { print uri; exit }
		}' "$f"
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		awk -v want="$1" '$1 == "deb" {
			i = 2
			if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
			if ($(i + 1) == want) { print $i; exit }
		}' "$f"
	done
}

fetch() {
	if [ -f "third_party/$tarball" ]; then
		verify
		echo "third_party/$tarball: already fetched, SHA-256 matches"
		return
	fi
	command -v apt-get >/dev/null ||
		die "apt-get not found: put Debian's or upstream's $tarball (SHA-256 in third_party/jemalloc.sha256) into third_party/"
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
	mirror=${DEBIAN_MIRROR:-$(mirror_of "$codename" | head -n 1)}
	mirror=${mirror:-http://deb.debian.org/debian}
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
	printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
		"$mirror" "$codename" >"$tmp/sources.list"
	set -- -q -o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=$tmp/none" \
		-o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o APT::Sandbox::User="$(id -un)"
	echo "== fetching jemalloc's source package from $mirror $codename (deb-src, private lists)"
	apt-get "$@" update >"$tmp/update.log" 2>&1 || { cat "$tmp/update.log"; die "apt-get update of the deb-src list failed"; }
	(cd "$tmp" && apt-get "$@" source --download-only jemalloc) || die "apt-get source jemalloc failed"
	[ -f "$tmp/$tarball" ] || die "the source package holds no $tarball (a newer upstream version?)"
	mkdir -p third_party
	mv "$tmp/$tarball" "third_party/$tarball"
	verify
	echo "third_party/$tarball: fetched, SHA-256 matches"
}

build() {
	dir=${1:-}
	case "$dir" in "" | / | . | ..) die "build needs a directory to build in, e.g. build/jemalloc" ;; esac
	[ -f "third_party/$tarball" ] ||
		die "third_party/$tarball is missing: run tools/jemalloc.sh fetch once (tools/setup.sh does it with the rest of the set-up)"
	verify
	start=$(date +%s)
	rm -rf "$dir"
	mkdir -p "$dir"
	tar -xjf "third_party/$tarball" -C "$dir" --strip-components=1
	cd "$dir"
	# A calling make's flags (a sanitizer's CFLAGS, its -j and variables) are not jemalloc's: its own
	# Makefile adds -fPIC to CFLAGS, which a CFLAGS from the command line would silently replace.
	unset MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES CFLAGS CPPFLAGS LDFLAGS EXTRA_CFLAGS
	# kvp_je_ prefix and no export: the host's malloc (glibc's, or its own jemalloc) stays the host's.
	# No initial-exec TLS: glibc has no static TLS to spare for a library loaded late with dlopen.
	# No dss: brk belongs to the host's malloc. No libdl: the real pthread_create, no lookup.
	./configure -q CC="${JE_CC:-cc}" CFLAGS="-O2 -g" \
		--with-jemalloc-prefix=kvp_je_ --without-export --with-private-namespace=kvp_je_private_ \
		--disable-initial-exec-tls --disable-cxx --disable-shared --disable-libdl \
		--with-malloc-conf=dss:disabled >configure.log 2>&1 || { tail -n 30 configure.log; die "configure failed"; }
	make -j"$(nproc)" lib/libjemalloc_pic.a >make.log 2>&1 || { tail -n 30 make.log; die "make failed"; }
	echo "jemalloc $version: $dir/lib/libjemalloc_pic.a built in $(($(date +%s) - start)) s"
}

case "${1:-}" in
fetch) fetch ;;
build) build "${2:-}" ;;
*) die "usage: tools/jemalloc.sh fetch | build DIR" ;;
esac
