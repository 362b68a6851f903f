#!/usr/bin/env bash
# What tests/stack needs, brought up on a fresh Debian machine and left alone where it is already
# there: a Docker engine (Debian's docker.io: dockerd 20.10, containerd, runc, and a client with
# BuildKit built in), debootstrap for the images' base, the daemon running, and a single-node
# Swarm. Needs root (or sudo) for what it has to install or start. scripts/test calls it.
set -euo pipefail

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  # apt's own temporary files under /tmp have been seen to vanish mid-install here.
  mkdir -p /var/tmp/apt-tmp 2>/dev/null || $sudo mkdir -p /var/tmp/apt-tmp
  $sudo env TMPDIR=/var/tmp/apt-tmp DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  $sudo env TMPDIR=/var/tmp/apt-tmp DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# The client that came with the engine answers for it; another client on PATH (a newer docker
# CLI) may be first, and works too for everything but a BuildKit build without buildx.
docker=docker
[ -x /usr/bin/docker ] && docker=/usr/bin/docker

if ! $docker info >/dev/null 2>&1; then
  if ! pgrep -x dockerd >/dev/null 2>&1; then
    echo "== starting dockerd (log: /var/log/dockerd.log)"
    # No init system starts it on these machines. setsid: it outlives this script, detached from
    # the terminal and from the test run's output.
    $sudo setsid sh -c 'exec dockerd >>/var/log/dockerd.log 2>&1' </dev/null >/dev/null 2>&1 &
  fi
  for _ in $(seq 1 60); do
    $docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! $docker info >/dev/null 2>&1; then
    echo "dockerd did not answer within 30 s; the end of /var/log/dockerd.log:" >&2
    tail -20 /var/log/dockerd.log >&2 || true
    exit 1
  fi
fi

if [ "$($docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
  echo "== docker swarm init (a single-node Swarm on 127.0.0.1)"
  $docker swarm init --advertise-addr 127.0.0.1 >/dev/null
fi
echo "== Docker $($docker version --format '{{.Server.Version}}'), Swarm $($docker info --format '{{.Swarm.LocalNodeState}}')"
