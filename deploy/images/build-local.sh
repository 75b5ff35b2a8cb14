#!/usr/bin/env bash
# Builds the RabbitMQ and PostgreSQL images the test suite runs under testcontainers, from
# Debian packages only: no image registry is needed (air-gapped networks, CI machines that
# reach only a Debian mirror and PyPI).
#
#   sudo bash deploy/images/build-local.sh
#
# Idempotent: each step is skipped when its result already exists. Run as root or with sudo;
# a non-root user running the tests needs access to the Docker socket (the docker group).
#   1. installs docker.io and debootstrap with apt-get if missing;
#   2. starts dockerd in the background if no engine answers, and waits for `docker info`;
#   3. builds local/rabbitmq:3.10 and local/postgres:15 (debootstrap --variant=minbase of
#      bookworm plus the Debian server package, then `docker import`) if missing.
#
# Environment:
#   DEBIAN_MIRROR    mirror for debootstrap; default: the first bookworm mirror in
#                    /etc/apt/sources.list*, else http://deb.debian.org/debian.
#                    In an air-gapped network point it at the internal mirror.
#   RABBITMQ_IMAGE   tag to build (default local/rabbitmq:3.10)
#   POSTGRES_IMAGE   tag to build (default local/postgres:15)
#   BUILD_DIR        scratch space for the root filesystems (default /var/tmp/ew-images)
#
# Then run the tests against them:
#   RABBITMQ_IMAGE=local/rabbitmq:3.10 POSTGRES_IMAGE=local/postgres:15 \
#   TESTCONTAINERS_RYUK_DISABLED=true make test
set -euo pipefail

RABBITMQ_IMAGE=${RABBITMQ_IMAGE:-local/rabbitmq:3.10}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-local/postgres:15}
BUILD_DIR=${BUILD_DIR:-/var/tmp/ew-images}
SUITE=bookworm
HERE=$(cd "$(dirname "$0")" && pwd)

say() { echo "build-local: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_busy() { pgrep -x apt-get >/dev/null || pgrep -x dpkg >/dev/null || pgrep -x apt >/dev/null; }

ensure_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -eq 0 ]; then
    say "docker.io and debootstrap already installed"
    return
  fi
  # Another apt-get may be installing them right now: wait for it instead of racing it.
  while apt_busy; do
    say "waiting for a running apt-get/dpkg to finish"
    sleep 5
  done
  command -v dockerd >/dev/null && command -v debootstrap >/dev/null && return
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap
}

ensure_engine() {
  if docker info >/dev/null 2>&1; then
    say "Docker engine already running"
    return
  fi
  if ! pgrep -x dockerd >/dev/null; then
    # An engine killed with its session leaves its pid files behind, and a new dockerd
    # refuses to start over them ("pid file found, ensure docker is not running").
    as_root rm -f /var/run/docker.pid /var/run/docker/containerd/containerd.pid
    say "starting dockerd (log: /var/tmp/dockerd.log)"
    as_root sh -c 'nohup dockerd >/var/tmp/dockerd.log 2>&1 &'
  fi
  for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
      say "Docker engine is up"
      return
    fi
    sleep 1
  done
  say "dockerd did not answer within 60 s; the end of /var/tmp/dockerd.log:"
  tail -n 20 /var/tmp/dockerd.log >&2 || true
  exit 1
}

find_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then
    echo "$DEBIAN_MIRROR"
    return
  fi
  local files=() mirror
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  if [ ${#files[@]} -gt 0 ]; then
    # deb822 ("URIs: X" with "Suites: bookworm ...") and one-line ("deb X bookworm main").
    mirror=$(awk '
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm" && uri != "") { print uri; exit } }
      /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { u = $i; if ($(i + 1) == "bookworm") { print u; exit } } }
    ' "${files[@]}" | head -n1)
    if [ -n "$mirror" ]; then
      echo "$mirror"
      return
    fi
  fi
  echo http://deb.debian.org/debian
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# debootstrap --foreign first so that a policy-rc.d is in place before any package's
# postinst runs: nothing may start a server inside the build chroot.
bootstrap() {
  local root=$1 include=$2 mirror=$3
  as_root rm -rf "$root"
  as_root mkdir -p "$root/usr/sbin"
  as_root debootstrap --variant=minbase --foreign --include="$include" "$SUITE" "$root" "$mirror" >&2
  printf '#!/bin/sh\nexit 101\n' | as_root tee "$root/usr/sbin/policy-rc.d" >/dev/null
  as_root chmod 755 "$root/usr/sbin/policy-rc.d"
  as_root chroot "$root" /debootstrap/debootstrap --second-stage >&2
  as_root chroot "$root" apt-get clean
  as_root rm -rf "$root/var/lib/apt/lists/"* "$root/usr/share/doc/"* "$root/usr/share/man/"*
}

import_image() {
  local root=$1 tag=$2
  shift 2
  as_root tar -C "$root" -c . | docker import "$@" - "$tag" >/dev/null
  as_root rm -rf "$root"
}

build_rabbitmq() {
  if image_exists "$RABBITMQ_IMAGE"; then
    say "$RABBITMQ_IMAGE already built"
    return
  fi
  local root=$BUILD_DIR/rabbitmq mirror
  mirror=$(find_mirror)
  say "building $RABBITMQ_IMAGE from $mirror"
  bootstrap "$root" rabbitmq-server "$mirror"
  # Tests connect through a mapped port, i.e. not from loopback: allow guest from anywhere.
  # The CMD is the server script itself, run as rabbitmq: it traps SIGTERM and stops the
  # node cleanly (Debian's /usr/sbin wrapper would be PID 1 and swallow `docker stop`).
  printf 'loopback_users = none\n' | as_root tee "$root/etc/rabbitmq/rabbitmq.conf" >/dev/null
  import_image "$root" "$RABBITMQ_IMAGE" \
    -c 'CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]' \
    -c 'USER rabbitmq' \
    -c 'ENV HOME=/var/lib/rabbitmq' \
    -c 'EXPOSE 5672'
  say "built $RABBITMQ_IMAGE"
}

# An image built before the entrypoint last changed gets the new one as a layer on top.
refresh_postgres_entrypoint() {
  local context
  if docker run --rm --entrypoint cat "$POSTGRES_IMAGE" /usr/local/bin/docker-entrypoint.sh |
    cmp -s - "$HERE/postgres-entrypoint.sh"; then
    say "$POSTGRES_IMAGE already built"
    return
  fi
  context=$(mktemp -d)
  install -m 755 "$HERE/postgres-entrypoint.sh" "$context/docker-entrypoint.sh"
  printf 'FROM %s\nCOPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh\n' \
    "$POSTGRES_IMAGE" >"$context/Dockerfile"
  docker build -q -t "$POSTGRES_IMAGE" "$context" >/dev/null
  rm -rf "$context"
  say "$POSTGRES_IMAGE: entrypoint updated"
}

build_postgres() {
  if image_exists "$POSTGRES_IMAGE"; then
    refresh_postgres_entrypoint
    return
  fi
  local root=$BUILD_DIR/postgres mirror
  mirror=$(find_mirror)
  say "building $POSTGRES_IMAGE from $mirror"
  bootstrap "$root" postgresql-15 "$mirror"
  # The package's default cluster is not used: the entrypoint initdb's its own from the
  # POSTGRES_* variables, like the official image.
  as_root rm -rf "$root/var/lib/postgresql/15/main" "$root/etc/postgresql/15/main"
  as_root install -m 755 "$HERE/postgres-entrypoint.sh" "$root/usr/local/bin/docker-entrypoint.sh"
  import_image "$root" "$POSTGRES_IMAGE" \
    -c 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    -c 'ENV PGDATA=/var/lib/postgresql/data' \
    -c 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'EXPOSE 5432'
  say "built $POSTGRES_IMAGE"
}

ensure_packages
ensure_engine
build_rabbitmq
build_postgres
say "done: $RABBITMQ_IMAGE and $POSTGRES_IMAGE are available"
