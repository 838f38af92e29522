#!/usr/bin/env bash
# The container engine behind `make image`, `make image-smoke` and the containerised run (README "Containers").
#   engine.sh name                       docker or podman: Docker when a Docker daemon answers, else podman
#   engine.sh setup                      podman installed (apt, as root or with password-less sudo) when no Docker answers
#   engine.sh base IMAGE                 IMAGE present: pulled, or made from Debian's archive when no registry answers
#   engine.sh build DOCKERFILE TAG       the image built from this checkout (its base made first with podman)
#   engine.sh run ARGS...                `docker run` / `podman run` with this machine's settings
# Under podman every call reads deploy/container/containers.conf (CONTAINERS_CONF): this kind of VM grants lower
# resource limits than podman's defaults, has a hybrid cgroup layout crun refuses (runc runs it) and no iptables
# for a container network (containers share the host's).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
# The folder of local wheels the Makefile uses (the CPU torch wheel): mounted into a podman build at the same path.
WHEELS="${WHEELS:-/opt/wheels}"
# Where debootstrap fetches Debian; default: the mirror apt on this machine uses.
DEBIAN_MIRROR="${DEBIAN_MIRROR:-}"
PULL_TIMEOUT_S="${PULL_TIMEOUT_S:-60}"

say() { echo "engine: $*" >&2; }

# `docker info` from a Docker daemon (not a podman service behind the Docker CLI); bounded where `timeout` exists.
docker_daemon_answers() {
  command -v docker >/dev/null 2>&1 || return 1
  local info
  if command -v timeout >/dev/null 2>&1; then info="$(timeout 10 docker info 2>/dev/null)" || return 1
  else info="$(docker info 2>/dev/null)" || return 1; fi
  ! grep -qi podman <<<"$info"
}

name() {
  if [ -z "${CONTAINER_ENGINE:-}" ]; then
    if docker_daemon_answers; then CONTAINER_ENGINE=docker; else CONTAINER_ENGINE=podman; fi
    export CONTAINER_ENGINE  # decided once per call of this script
  fi
  echo "$CONTAINER_ENGINE"
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif sudo -n true 2>/dev/null; then sudo -n "$@"
  else say "not root and no password-less sudo: install $* yourself"; return 1; fi
}

setup() {
  [ "$(name)" = docker ] && return 0
  if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || { say "no Docker daemon and no apt-get: install podman (or Docker) yourself"; return 1; }
    say "installing podman, runc and debootstrap (Debian's packages)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      podman runc fuse-overlayfs uidmap debootstrap ca-certificates >/dev/null
  fi
  podman info >/dev/null || { say "podman is installed but does not run: podman info says why"; return 1; }
}

apt_mirror() {
  if [ -n "$DEBIAN_MIRROR" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local uri
  uri="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)"
  [ -z "$uri" ] && uri="$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# The python:3.11-slim-bookworm stand-in: Debian bookworm (minbase) with its Python 3.11, this machine's extra CA
# certificates trusted (TLS to PyPI is re-signed on the way out here), `python` on PATH as in the official image.
make_base() {
  local image="$1" dir
  dir="$(mktemp -d /var/tmp/omnithought-base.XXXXXX)"
  # shellcheck disable=SC2064  # the folder's name now: the trap outlives this function's locals
  trap "rm -rf '$dir.log'; $( [ "$(id -u)" = 0 ] && echo "" || echo "sudo -n") rm -rf '$dir'" EXIT
  say "no registry answered: making $image from Debian's archive ($(apt_mirror))"
  as_root debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
    bookworm "$dir" "$(apt_mirror)" >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; rm -f "$dir.log"; return 1; }
  rm -f "$dir.log"
  # The tree debootstrap made is root's: every step on it runs as root.
  if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    as_root cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
  fi
  as_root chroot "$dir" update-ca-certificates >/dev/null 2>&1
  as_root ln -sf python3 "$dir/usr/bin/python"
  as_root sh -c "rm -rf '$dir'/var/cache/apt/archives/*.deb '$dir'/var/lib/apt/lists/*"
  as_root tar -C "$dir" -c . | podman import -q \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --change 'CMD ["python3"]' - "localhost/$image" >/dev/null
  # The name a Dockerfile's FROM resolves to as well, so `--pull=never` finds it.
  podman tag "localhost/$image" "docker.io/library/$image"
}

base() {
  local image="$1" engine
  engine="$(name)"
  if [ "$engine" = docker ]; then docker image inspect "$image" >/dev/null 2>&1 || docker pull "$image"; return; fi
  setup
  podman image exists "docker.io/library/$image" && return 0
  if timeout "$PULL_TIMEOUT_S" podman pull -q "docker.io/library/$image" >/dev/null 2>&1; then return 0; fi
  make_base "$image"
}

build() {
  local dockerfile="$1" tag="$2" engine from started
  shift 2
  engine="$(name)"
  started=$SECONDS
  from="$(awk 'toupper($1)=="FROM" {print $2; exit}' "$dockerfile")"
  base "$from"
  if [ "$engine" = docker ]; then
    docker build -f "$dockerfile" -t "$tag" "$@" "$root"
  else
    local mounts=(--pull=never)
    [ -d "$WHEELS" ] && mounts+=(-v "$WHEELS:/opt/wheels:ro")
    podman build "${mounts[@]}" -f "$dockerfile" -t "$tag" "$@" "$root"
  fi
  say "built $tag with $engine in $((SECONDS - started)) s ($("$engine" image inspect --format '{{.Size}}' "$tag") bytes)"
}

run() {
  local engine
  engine="$(name)"
  [ "$engine" = podman ] && setup
  "$engine" run "$@"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  name) name ;;
  setup) setup ;;
  base) [ $# -ge 1 ] || { say "usage: engine.sh base IMAGE"; exit 2; }; base "$@" ;;
  build) [ $# -ge 2 ] || { say "usage: engine.sh build DOCKERFILE TAG [build args]"; exit 2; }; build "$@" ;;
  run) run "$@" ;;
  *) say "usage: engine.sh name | setup | base IMAGE | build DOCKERFILE TAG [build args] | run ARGS"; exit 2 ;;
esac
