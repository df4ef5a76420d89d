#!/usr/bin/env bash
# The container image's tooling (image.mk calls it; run from the repository root):
#
#   .ci/image.sh engine             prints the engine that `build` uses: docker when `docker info` works, else podman
#   .ci/image.sh setup              podman: installs podman/buildah/runc/debootstrap when missing (apt-get) and
#                                   writes the configuration every podman call here uses (.cache/containers/)
#   .ci/image.sh base               podman: makes debian:bookworm-slim resolvable locally (no registry here): a
#                                   Debian 12 minbase root filesystem from debootstrap, imported under that name
#   .ci/image.sh build IMAGE [TARGET]  builds IMAGE from ./Dockerfile's TARGET stage (cpu, the default, or cuda;
#                                   ENGINE=docker|podman forces an engine)
#   .ci/image.sh run IMAGE PORT     runs IMAGE in the foreground as the chart's pod runs it (see run_image)
#   .ci/image.sh exists IMAGE       exit status 0 when podman's store has IMAGE
#   .ci/image.sh podman ARGS...     podman with this configuration (what the image tests use)
#
# What this machine needs (and where there is no Docker engine, what podman needs): runc, not crun (crun
# refuses hybrid cgroup v1 hierarchies); no default ulimits (RLIMIT_NOFILE cannot be raised in here);
# cgroupfs and file events (no systemd); overlay storage where the kernel mounts it, else vfs
# (CONTAINER_STORAGE_DRIVER overrides; vfs copies the whole root filesystem at every layer), in a
# store of its own under /var/lib/containers/cifar10-kserve (CONTAINER_STORE=name for another).
set -euo pipefail
cd "$(dirname "$0")/.."

CONF_DIR="$PWD/.cache/containers"
PYTHON="${PYTHON:-python3}"
HELM="${HELM:-.cache/tools/bin/helm}"

log() { echo "image.sh: $*" >&2; }

# -- podman's configuration ------------------------------------------------------------------------
overlay_works() {
    grep -qw overlay /proc/filesystems 2>/dev/null || modprobe overlay 2>/dev/null || return 1
    local d rc=0
    d=$(mktemp -d)
    mkdir -p "$d"/{lower,upper,work,merged}
    mount -t overlay overlay -o "lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work" "$d/merged" 2>/dev/null || rc=1
    [ "$rc" = 0 ] && umount "$d/merged"
    rm -rf "$d"
    return "$rc"
}

write_config() {
    mkdir -p "$CONF_DIR"
    local driver="${CONTAINER_STORAGE_DRIVER:-}"
    if [ -z "$driver" ]; then
        if [ -f "$CONF_DIR/driver" ]; then driver=$(cat "$CONF_DIR/driver")
        elif overlay_works; then driver=overlay
        else driver=vfs
        fi
    fi
    echo "$driver" > "$CONF_DIR/driver"
    # A store (and libpod state) of its own, per driver, shared by every clone on this machine (so the
    # layer cache is too): podman's database records the driver it was created with, and the cleanup
    # that conmon runs when a container exits (with an explicit --storage-driver) fails on a store
    # created without one (`podman run` then waits 20 s for the exit it never hears of).
    # CONTAINER_STORE=name gives a store apart (e.g. to time a build with an empty cache).
    local store="${CONTAINER_STORE:-cifar10-kserve}"
    local graphroot=/var/lib/containers/$store/$driver runroot=/run/containers/$store/$driver
    cat > "$CONF_DIR/storage.conf" <<EOF
# Written by .ci/image.sh (CONTAINERS_STORAGE_CONF of every podman call of the image tooling).
[storage]
driver = "$driver"
graphroot = "$graphroot"
runroot = "$runroot"
EOF
    cat > "$CONF_DIR/containers.conf" <<EOF
# Written by .ci/image.sh (CONTAINERS_CONF of every podman call of the image tooling).
[containers]
# The default RLIMIT_NOFILE raise is refused on these machines.
default_ulimits = []

[engine]
# crun refuses this host's hybrid cgroup hierarchy; runc works.
runtime = "runc"
# No systemd here.
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "/run/libpod-$store/$driver"
EOF
}

use_config() {
    write_config
    export CONTAINERS_CONF="$CONF_DIR/containers.conf" CONTAINERS_STORAGE_CONF="$CONF_DIR/storage.conf"
}

pm() { use_config; podman "$@"; }

setup() {
    local missing=()
    for tool in podman buildah runc debootstrap; do
        command -v "$tool" > /dev/null || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]} (apt-get)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            podman buildah runc debootstrap catatonit netavark aardvark-dns uidmap > /dev/null
    fi
    write_config
    log "podman $(podman --version | awk '{print $3}'), storage $(cat "$CONF_DIR/driver"), runtime runc"
}

engine() {
    if [ -n "${ENGINE:-}" ]; then echo "$ENGINE"
    elif command -v docker > /dev/null && docker info > /dev/null 2>&1; then echo docker
    else echo podman
    fi
}

# -- the base image --------------------------------------------------------------------------------
BASE=docker.io/library/debian:bookworm-slim

debian_mirror() {
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/debian.sources | grep -v security | head -n 1)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

base() {
    if pm image exists "$BASE"; then return; fi
    if pm pull --quiet "$BASE" > /dev/null 2>&1; then log "pulled $BASE"; return; fi
    local mirror rootfs start=$SECONDS
    mirror=$(debian_mirror)
    rootfs=$(mktemp -d /var/tmp/bookworm-rootfs.XXXXXX)
    log "no registry: building $BASE with debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" > "$CONF_DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CONF_DIR/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1; }
    # As the official slim image: Debian's apt sources (main, updates, security) in deb822 form, no
    # documentation installed by later packages, no apt caches.
    rm -f "$rootfs/etc/apt/sources.list"
    cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
    cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    tar -C "$rootfs" --numeric-owner -c . \
        | pm import --change 'CMD ["bash"]' --message "debootstrap --variant=minbase bookworm $mirror" - "$BASE" > /dev/null
    rm -rf "$rootfs"
    log "$BASE imported ($((SECONDS - start)) s)"
}

# -- pip inside the build sees the host's package index --------------------------------------------
# The effective pip configuration of this machine (`pip config list`: files and PIP_* variables) is
# written to one file that the build mounts read-only as /etc/pip.conf; the local folders and files it
# names (file:// indexes, find-links, constraint files) are mounted read-only at the same paths. The CA
# bundle it names goes to a path of its own: a bind mount over /etc/ssl/certs would break the
# ca-certificates package that the build installs.
pip_mounts() {
    local conf="$CONF_DIR/pip.conf"
    "$PYTHON" - "$conf" <<'EOF'
import configparser, os, re, subprocess, sys

out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
config = configparser.ConfigParser(interpolation=None)
mounts = {}
# pip ranks PIP_* variables (`:env:`) above every file: apply them last.
for line in sorted(out.splitlines(), key=lambda l: l.startswith(":env:")):
    match = re.fullmatch(r"(:env:|[\w-]+)\.([\w-]+)='(.*)'", line.strip())
    if not match:
        continue
    section, key, value = match.groups()
    section = "global" if section == ":env:" else section
    if not config.has_section(section):
        config.add_section(section)
    if key in ("cert", "client-cert") and os.path.isfile(value):
        target = f"/etc/pip-build/{key}.pem"
        mounts[target] = value
        value = target
    else:
        for token in value.split():
            path = token[len("file://"):] if token.startswith("file://") else token
            if path.startswith("/") and os.path.exists(path):
                path = path.rstrip("/")
                # A PEP 503 index links to ../../files/...: mount the folder above .../simple.
                path = os.path.dirname(path) if os.path.basename(path) == "simple" else path
                mounts[path] = path
    config.set(section, key, value)  # later lines (user files, then the environment) win
with open(sys.argv[1], "w") as f:
    f.write("# Written by .ci/image.sh from `pip config list` on the build machine.\n")
    config.write(f)
for target, source in mounts.items():
    print(f"{source}:{target}:ro")
EOF
    echo "$conf:/etc/pip.conf:ro"
}

build() {
    local image="$1" target="${2:-cpu}" eng start=$SECONDS
    eng=$(engine)
    if [ "$eng" = docker ]; then
        docker build --target "$target" --tag "$image" .
    else
        setup
        base
        local args=() mount
        while IFS= read -r mount; do args+=(--volume "$mount"); done < <(pip_mounts)
        # --format docker keeps the Dockerfile's HEALTHCHECK (the OCI format has no such field);
        # --pull=never: the base is local (see `base`); chroot isolation and the host network are
        # what work on these machines.
        pm build --format docker --pull=never --layers --isolation chroot --network host \
            "${args[@]}" --target "$target" --tag "$image" .
    fi
    log "built $image ($target) with $eng in $((SECONDS - start)) s"
    if [ "$eng" = podman ]; then
        pm image inspect --format 'image.sh: {{.Id}} {{.Size}} bytes' "$image" >&2
    fi
}

# -- running it as the chart's pod does ------------------------------------------------------------
# The container of the chart's rendered InferenceService (default values, containerPort=PORT, and
# gpu.enabled=false where this machine has no NVIDIA GPU: the default pod asks for DEVICE=cuda and would
# stop; more with CHART_VALUES=file / CHART_SET="k=v ..."), as `podman run` flags (.ci/chart_pod.py): its args and
# env, its user, read-only root filesystem, dropped capabilities, no privilege escalation, seccomp,
# its emptyDir volumes as tmpfs (only /tmp is writable), its CPU and memory limits; host network.
# Runs in the foreground; SIGTERM or SIGINT to this script (or to make, which passes SIGTERM on to it)
# goes to the container, which drains; the exit status is the container's.
run_image() {
    local image="$1" port="$2" eng
    eng=$(engine)
    local chart_args=(--image "$image" --port "$port" --helm "$HELM")
    local gpu=()
    if [ -e /dev/nvidia0 ]; then
        # Untested here (no GPU on these machines): the GPU as Docker and podman (CDI) pass it.
        if [ "$eng" = docker ]; then gpu=(--gpus all); else gpu=(--device nvidia.com/gpu=all); fi
    else
        log "no NVIDIA GPU here: the chart's pod for a CPU node (gpu.enabled=false)"
        chart_args+=(--set gpu.enabled=false)
    fi
    [ -n "${CHART_VALUES:-}" ] && chart_args+=(--values "$CHART_VALUES")
    for item in ${CHART_SET:-}; do chart_args+=(--set "$item"); done
    local flags=()
    mapfile -d '' flags < <("$PYTHON" .ci/chart_pod.py run-flags "${chart_args[@]}")
    [ "${#flags[@]}" -gt 0 ] || { log "could not render the chart's pod"; exit 1; }
    local name="cifar10-run-image-$port"
    if [ "$eng" = docker ]; then
        docker run --rm --name "$name" --network host "${gpu[@]}" "${flags[@]}" &
    else
        use_config
        podman run --rm --name "$name" --network host --no-healthcheck "${gpu[@]}" "${flags[@]}" &
    fi
    local pid=$!
    trap 'log "SIGTERM: passing it to the container"; kill -TERM "$pid" 2>/dev/null || true' TERM
    trap 'log "SIGINT: passing SIGTERM to the container"; kill -TERM "$pid" 2>/dev/null || true' INT
    local rc=0
    # `wait` returns early when a trapped signal arrives: wait again until the engine has exited.
    while true; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    log "container exited with status $rc"
    exit "$rc"
}

case "${1:-}" in
    engine) engine ;;
    setup) setup ;;
    base) use_config; base ;;
    build) build "${2:?image}" "${3:-cpu}" ;;
    run) run_image "${2:?image}" "${3:?port}" ;;
    exists) pm image exists "${2:?image}" ;;
    podman) shift; pm "$@" ;;
    *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
