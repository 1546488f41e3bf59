#!/usr/bin/env bash
# Build the Dockerfile without a Docker engine and prove the image serves.
#
#   bash scripts/container_test.sh          (as root; called at the end of .ci/run)
#
# 1. base    a minimal Debian bookworm with python3 + python3-venv, made with
#            debootstrap and imported as localhost/base:bookworm (no registry is
#            reachable). The trimmed rootfs tarball and the imported image are cached
#            in $MAILROOM_CI_CACHE (default /var/cache/mailroom-ci) and rebuilt when
#            the recipe changes or the tarball is older than
#            $MAILROOM_CI_BASE_MAX_AGE_DAYS (default 30) days.
# 2. build   buildah bud --storage-driver vfs --isolation chroot --pull-never with
#            BASE=localhost/base:bookworm. The host's pip configuration (files and
#            PIP_* variables) is rewritten into one pip.conf and the local paths it
#            names (CA bundle, constraints, local indexes) are bind-mounted read-only
#            under /mnt; see scripts/container/pip_build_config.py.
# 3. image   checks the image config (USER, EXPOSE, VOLUME, ENV, HEALTHCHECK,
#            STOPSIGNAL, OCI labels) and its filesystem (venv, no pip/compilers/
#            caches/test dependencies, /data ownership).
# 4. run     starts the image's own command with buildah run (host network, free
#            port, temporary /data, an API key) and checks /health, /ready, POST
#            /v1/accounts, the uid of the server process, the files in /data, the
#            image's HEALTHCHECK command, and a clean exit on SIGTERM.
# 5. postgres the same image and container again, only the environment differs:
#            MAILROOM_DATABASE=postgresql://... (a fresh database on the server the test
#            suite uses: $MAILROOM_TEST_POSTGRES, else 127.0.0.1:5432 with trust auth as
#            postgres, else a throw-away cluster; see scripts/container/pg_database.py),
#            a generated MAILROOM_SECRET_KEY, an API key. Checks /health, /ready (a
#            database round trip), an account created, read back and listed, nothing in
#            /data, a graceful exit on SIGTERM, then the rows in PostgreSQL (read with the
#            project's .venv: asyncpg and the service's cipher). The database is dropped
#            (and a cluster started for it stopped) on every exit.
#
# Everything lives in a private container storage (in RAM under /dev/shm/mailroom-ci
# when it has 3 GB free, else $CACHE/storage; override with $MAILROOM_CI_STORAGE),
# guarded by a lock, so the script never touches other images or containers.
# Exits non-zero on any failure; cleans up its containers and processes on exit.
#
# Knobs (environment): MAILROOM_CI_CACHE, MAILROOM_CI_STORAGE, MAILROOM_CI_IMAGE
# (default localhost/mailroom:ci), MAILROOM_CI_REFRESH_BASE=1 (debootstrap again),
# MAILROOM_CI_BASE_MAX_AGE_DAYS, MAILROOM_CI_DEBIAN_MIRROR (default: the host's apt
# mirror), MAILROOM_CI_BUILD_TIMEOUT / _START_TIMEOUT / _STOP_TIMEOUT / _PG_TIMEOUT
# (seconds), MAILROOM_TEST_POSTGRES (a server DSN the run may create a database on).
set -Eeuo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS=$ROOT/scripts/container
CACHE=${MAILROOM_CI_CACHE:-/var/cache/mailroom-ci}
IMAGE=${MAILROOM_CI_IMAGE:-localhost/mailroom:ci}
SUITE=bookworm
BASE_IMAGE=localhost/base:$SUITE
BASE_INCLUDE=python3,python3-venv,ca-certificates
BASE_RECIPE=4 # bump when the debootstrap/trim recipe below changes
BASE_MAX_AGE_DAYS=${MAILROOM_CI_BASE_MAX_AGE_DAYS:-30}
BUILD_TIMEOUT=${MAILROOM_CI_BUILD_TIMEOUT:-1200}
START_TIMEOUT=${MAILROOM_CI_START_TIMEOUT:-60}
STOP_TIMEOUT=${MAILROOM_CI_STOP_TIMEOUT:-30}
PG_TIMEOUT=${MAILROOM_CI_PG_TIMEOUT:-180} # finding or starting PostgreSQL (initdb; apt-get at worst)
DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

T0=$EPOCHREALTIME
exec {STDOUT}>&1 {STDERR}>&2 # cleanup() reports here even when a redirection is in force
log() { printf '[container-test %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() {
	log "FAIL: $*"
	exit 1
}
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
# Hide hostnames (mirrors, registries) in anything this script prints from logs.
redact() { sed -E 's#([a-zA-Z][a-zA-Z0-9+.-]*://)[^/ "]+#\1<host>#g'; }

[[ $(id -u) == 0 ]] || die "run as root (buildah with vfs storage and chroot isolation)"
RUNROOT=/run/mailroom-ci
[[ -d /run && -w /run ]] || RUNROOT=$CACHE/runroot
# vfs copies the whole root filesystem for every container and layer, so the
# storage lives in RAM when there is room (3x faster on a busy disk); it then lasts
# until reboot, after which the base is re-imported from the tarball on disk (~5 s).
STORAGE=${MAILROOM_CI_STORAGE:-}
if [[ -z $STORAGE ]]; then
	STORAGE=$CACHE/storage
	shm_free_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }') || true
	((${shm_free_kb:-0} >= 3 * 1024 * 1024)) && STORAGE=/dev/shm/mailroom-ci/storage
fi
STORE=(--storage-driver vfs --root "$STORAGE" --runroot "$RUNROOT")
bah() { buildah "${STORE[@]}" "$@"; }

# ------------------------------------------------------------------------- cleanup
TMP='' CTR='' RUN_PID='' SERVER_PID='' ROOTFS='' BG_PID='' PG_PID='' PG_LOG_SHOWN=0
in_background() { # long steps run as a waited-for child, so a signal interrupts them at once
	local rc=0
	"$@" 9>&- & # fd 9 holds the lock: an orphan must never keep it
	BG_PID=$!
	wait "$BG_PID" || rc=$?
	BG_PID=''
	return "$rc"
}
rmtree() { # remove a directory without ever crossing into a mount inside it
	local dir=$1 m
	[[ -n $dir && -d $dir ]] || return 0
	while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(
		awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r
	)
	rm -rf --one-file-system -- "$dir"
}
stop_pid() { # stop_pid PID SECONDS: TERM, wait, KILL
	local pid=$1 i
	[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < $2 * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
	local rc=$?
	set +e
	trap - EXIT INT TERM ERR
	exec 1>&"$STDOUT" 2>&"$STDERR"
	stop_pid "$BG_PID" 20
	[[ -n $BG_PID ]] && wait "$BG_PID" 2>/dev/null
	stop_pid "$SERVER_PID" 5
	stop_pid "$RUN_PID" 5
	[[ -n $RUN_PID ]] && wait "$RUN_PID" 2>/dev/null
	if [[ -n $PG_PID ]]; then # drops the database, stops a cluster it started
		stop_pid "$PG_PID" 30
		wait "$PG_PID" 2>/dev/null
		tail -n "+$((PG_LOG_SHOWN + 1))" "$TMP/postgres.log" 2>/dev/null | redact
	fi
	if [[ -n $CTR ]]; then
		bah umount "$CTR" >/dev/null 2>&1 || true
		bah rm "$CTR" >/dev/null 2>&1 || true
	fi
	rmtree "$ROOTFS"
	rmtree "$TMP"
	if ((rc == 0)); then
		log "PASS in $(since "$T0")s"
	else
		log "FAILED (exit $rc) after $(since "$T0")s"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "error: line $LINENO: $BASH_COMMAND"' ERR

# ------------------------------------------------------------------------- tools
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
[[ -e /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
command -v python3 >/dev/null || missing+=(python3)
if ((${#missing[@]})); then
	log "installing ${missing[*]}"
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
log "$(buildah --version | head -1); $(podman --version); python3 $(python3 -c 'import platform; print(platform.python_version())')"

[[ $STORAGE == /dev/shm/mailroom-ci/storage ]] && install -d -m 0700 /dev/shm/mailroom-ci
mkdir -p "$CACHE" "$RUNROOT" "$STORAGE"
exec 9>"$CACHE/lock"
flock -w 3600 9 || die "could not lock $CACHE/lock within an hour"
TMP=$(mktemp -d /tmp/mailroom-ci.XXXXXX)
chmod 755 "$TMP"
# Leftovers of an interrupted earlier run (we hold the lock: nothing else uses this storage).
bah rm --all >/dev/null 2>&1 || true

# ------------------------------------------------------------------------- 1. base
debian_mirror() { # the host's own Debian mirror, so the base comes from where apt does
	if [[ -n ${MAILROOM_CI_DEBIAN_MIRROR:-} ]]; then
		echo "$MAILROOM_CI_DEBIAN_MIRROR"
		return
	fi
	python3 - "$SUITE" <<-'EOF'
		import glob, re, sys
		suite, found = sys.argv[1], []
		def add(uris, suites, enabled=True):
		    for uri in uris:
		        if enabled and re.search(r"/debian/?$", uri):
		            found.append((suite not in suites, uri.rstrip("/")))
		files = glob.glob("/etc/apt/sources.list") + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
		for f in files:
		    for line in open(f, errors="replace"):
		        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
		        if len(line) >= 3 and line[0] == "deb":
		            add([line[1]], [line[2]])
		for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
		    for para in re.split(r"\n\s*\n", open(f, errors="replace").read()):
		        fields = {}
		        for line in para.splitlines():
		            if ":" in line and not line.startswith("#"):
		                k, v = line.split(":", 1)
		                fields[k.strip().lower()] = v.split()
		        if "deb" in fields.get("types", []):
		            add(fields.get("uris", []), fields.get("suites", []),
		                fields.get("enabled", ["yes"])[0].lower() != "no")
		print(sorted(found)[0][1] if found else "http://deb.debian.org/debian")
	EOF
}

trim_rootfs() { # what the official Debian images leave out: apt state, docs, logs
	local r=$1
	chmod 0755 "$r" # the image's / (mktemp made it 0700: no one but root could exec anything)
	rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/*.bin "$r"/var/lib/apt/lists/*
	rm -rf "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/locale/* "$r"/var/cache/debconf/*-old
	find "$r"/usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
	find "$r"/usr/share/doc -mindepth 1 -type d -empty -delete
	find "$r"/var/log -type f -delete
	# No trace of this machine: default mirror, no resolver/host names.
	printf 'deb http://deb.debian.org/debian %s main\n' "$SUITE" >"$r"/etc/apt/sources.list
	: >"$r"/etc/resolv.conf
	: >"$r"/etc/hostname
	rm -f "$r"/etc/machine-id "$r"/var/lib/dbus/machine-id
}

T_BASE=$EPOCHREALTIME
base_key="suite=$SUITE variant=minbase include=$BASE_INCLUDE arch=$(dpkg --print-architecture) recipe=$BASE_RECIPE"
base_tar=$CACHE/base-$SUITE.tar
base_keyfile=$CACHE/base-$SUITE.key
tar_fresh=false
if [[ -s $base_tar && -f $base_keyfile && $(<"$base_keyfile") == "$base_key" ]] &&
	[[ -z $(find "$base_tar" -mtime "+$BASE_MAX_AGE_DAYS") ]] &&
	[[ ${MAILROOM_CI_REFRESH_BASE:-0} != 1 ]]; then
	tar_fresh=true
fi
base_imported=$STORAGE.base-$SUITE.key # what the image in this storage was made from
if $tar_fresh && [[ -f $base_imported && $(<"$base_imported") == "$base_key" ]] &&
	bah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
	BASE_HOW=warm
	log "1. base: cached image $BASE_IMAGE"
else
	if ! $tar_fresh; then
		BASE_HOW=cold
		mirror=$(debian_mirror)
		ROOTFS=$(mktemp -d "$(dirname "$STORAGE")/rootfs.XXXXXX") # beside the storage: RAM if possible
		# debootstrap fetches with wget: give it apt's proxy, if apt has one.
		proxy=$(apt-config shell p Acquire::http::Proxy 2>/dev/null | sed -nE "s/^p='(.*)'$/\1/p") || true
		[[ -n $proxy && $proxy != DIRECT ]] && export http_proxy=$proxy
		log "1. base: debootstrap --variant=minbase --include=$BASE_INCLUDE $SUITE (mirror from the host's apt sources)"
		if ! in_background timeout 900 debootstrap --variant=minbase --include="$BASE_INCLUDE" --components=main \
			"$SUITE" "$ROOTFS" "$mirror" >"$TMP/debootstrap.log" 2>&1; then
			tail -n 30 "$TMP/debootstrap.log" | redact
			tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" 2>/dev/null | redact
			die "debootstrap failed"
		fi
		trim_rootfs "$ROOTFS"
		tar --numeric-owner --xattrs -C "$ROOTFS" -cf "$base_tar.tmp" .
		mv -f "$base_tar.tmp" "$base_tar"
		printf '%s\n' "$base_key" >"$base_keyfile"
		rmtree "$ROOTFS"
		ROOTFS=''
		log "   rootfs tarball $(du -h "$base_tar" | cut -f1) cached at $base_tar ($(since "$T_BASE")s)"
	else
		BASE_HOW=tarball
		log "1. base: importing the cached rootfs tarball"
	fi
	bah rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
	podman "${STORE[@]}" import --quiet \
		--change "ENV PATH=$DEFAULT_PATH" --change 'CMD ["/bin/bash"]' \
		"$base_tar" "$BASE_IMAGE" >/dev/null
	printf '%s\n' "$base_key" >"$base_imported"
fi
BASE_SECS=$(since "$T_BASE")
log "   base ready: $BASE_HOW, ${BASE_SECS}s"

# ------------------------------------------------------------------------- 2. build
T_BUILD=$EPOCHREALTIME
log "2. build: buildah bud --format docker --isolation chroot --pull-never --build-arg BASE=$BASE_IMAGE"
python3 "$HELPERS/pip_build_config.py" --outdir "$TMP/pip" --prefix /mnt >"$TMP/mounts.tsv" 2>"$TMP/pip-config.txt" ||
	die "$(cat "$TMP/pip-config.txt")"
sed 's/^/   /' "$TMP/pip-config.txt"
vols=()
while IFS=$'\t' read -r src dst mode; do
	vols+=(-v "$src:$dst:$mode")
done <"$TMP/mounts.tsv"

version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
	"$ROOT/pyproject.toml" 2>/dev/null || echo 0.0.0)
revision=$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
build_args=(
	--build-arg "BASE=$BASE_IMAGE"
	--build-arg "PIP_CONFIG_FILE=/mnt/pip.conf"
	--build-arg "VERSION=$version"
	--build-arg "REVISION=$revision"
	--build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
)
build_rc=0
in_background timeout "$BUILD_TIMEOUT" buildah "${STORE[@]}" bud --format docker --isolation chroot --pull-never \
	--force-rm --layers=false "${build_args[@]}" "${vols[@]}" \
	-f "$ROOT/Dockerfile" -t "$IMAGE" "$ROOT" >"$TMP/build.log" 2>&1 || build_rc=$?
grep -E '^\[[0-9]+/[0-9]+\] STEP|^STEP ' "$TMP/build.log" | cut -c1-140 | sed 's/^/   /' || true
if ((build_rc != 0)); then
	echo "   --- build log (tail) ---"
	tail -n 60 "$TMP/build.log" | redact | sed 's/^/   /'
	die "buildah bud failed (exit $build_rc)"
fi
# The previous build of $IMAGE is now untagged: drop it (the base stays tagged).
bah rmi --prune >/dev/null 2>&1 || true
BUILD_SECS=$(since "$T_BUILD")
log "   built $IMAGE in ${BUILD_SECS}s"

# ------------------------------------------------------------------------- 3. image
log "3. image: configuration and filesystem"
bah inspect --type image "$IMAGE" >"$TMP/inspect.json"
uid=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["Docker"]["config"]["User"].split(":")[0])' "$TMP/inspect.json")
[[ $uid =~ ^[0-9]+$ && $uid != 0 ]] || die "image USER is not a numeric non-root uid: '$uid'"
python3 "$HELPERS/smoke.py" image --inspect "$TMP/inspect.json" --uid "$uid"
CTR=$(bah from --pull-never --name "mailroom-ci-$$" "$IMAGE")
mnt=$(bah mount "$CTR")
python3 "$HELPERS/smoke.py" rootfs --root "$mnt" --pyproject "$ROOT/pyproject.toml" --uid "$uid"
VENV_SIZE=$(du -sh "$mnt/opt/venv" | cut -f1)
bah umount "$CTR" >/dev/null

# ------------------------------------------------------------------------- 4. run
SERVER_LOG=$TMP/server.log # the output of the container that runs now
show_server_log() {
	echo "   --- container output (tail) ---"
	tail -n 40 "$SERVER_LOG" | redact | sed 's/^/   /'
}
stop_server() { # SIGTERM to the server process: it must exit, gracefully, within STOP_TIMEOUT
	local i stopped=false run_rc=0 t_stop=$EPOCHREALTIME
	kill -TERM "$SERVER_PID"
	for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
		if ! kill -0 "$RUN_PID" 2>/dev/null; then
			stopped=true
			break
		fi
		sleep 0.1
	done
	if ! $stopped; then
		show_server_log
		die "the server did not exit within ${STOP_TIMEOUT}s of SIGTERM"
	fi
	wait "$RUN_PID" || run_rc=$?
	RUN_PID=''
	STOP_SECS=$(since "$t_stop")
	if kill -0 "$SERVER_PID" 2>/dev/null; then
		die "server process $SERVER_PID still alive after its container command returned"
	fi
	SERVER_PID=''
	# uvicorn re-raises the SIGTERM after its graceful shutdown so that the exit status
	# says "terminated" (docker shows 143); buildah reports that as "exited on terminated".
	if ((run_rc != 0)) && ! grep -q 'exited on terminated' "$SERVER_LOG"; then
		show_server_log
		die "the server exited with status $run_rc after SIGTERM (expected 0 or terminated-by-SIGTERM)"
	fi
	echo "  ok: SIGTERM -> the server exited in ${STOP_SECS}s ($( ((run_rc == 0)) && echo 'status 0' || echo 'terminated by SIGTERM'))"
	if ! grep -qi 'shutdown complete' "$SERVER_LOG"; then
		show_server_log
		die "no sign of a graceful shutdown (the application's shutdown did not complete)"
	fi
	echo "  ok: the application's graceful shutdown completed"
}
check_no_traceback() {
	if grep -q 'Traceback (most recent call last)' "$SERVER_LOG"; then
		show_server_log
		die "the server logged a traceback"
	fi
	echo "  ok: no traceback in the server output"
}

T_RUN=$EPOCHREALTIME
mapfile -d '' -t cmd < <(python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))["Docker"]["config"]
sys.stdout.write("\0".join((c.get("Entrypoint") or []) + (c.get("Cmd") or [])) + "\0")' "$TMP/inspect.json")
mapfile -d '' -t healthcheck < <(python3 -c '
import json, sys
t = json.load(open(sys.argv[1]))["Docker"]["config"]["Healthcheck"]["Test"]
argv = t[1:] if t[0] == "CMD" else ["/bin/sh", "-c", t[1]]
sys.stdout.write("\0".join(argv) + "\0")' "$TMP/inspect.json")
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# A urlsafe key may begin with "-": it is passed as --api-key=KEY, never as a separate argument.
api_key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
data=$TMP/data
install -d -o "$uid" -g "$uid" -m 0700 "$data"
run_env=(-e "MAILROOM_PORT=$port" -e "MAILROOM_API_KEYS=$api_key" -e "MAILROOM_ALLOWED_NETWORKS=127.0.0.0/8")
# docker run -v HOST:/data replaces the image's anonymous /data volume; so must we
# (buildah run would otherwise mount a fresh anonymous volume over the -v below).
bah config --volume /data- "$CTR"
log "4. run: buildah run --isolation chroot (host network) -- ${cmd[*]}  [port $port, /data = temp dir]"
# Not through bah(): $! must be buildah's own pid.
buildah "${STORE[@]}" run --isolation chroot --network host -v "$data:/data" "${run_env[@]}" \
	"$CTR" -- "${cmd[@]}" >"$SERVER_LOG" 2>&1 9>&- &
RUN_PID=$!
if ! in_background python3 "$HELPERS/smoke.py" serve --port "$port" --api-key="$api_key" --data "$data" \
	--uid "$uid" --runner-pid "$RUN_PID" --pid-file "$TMP/server.pid" --timeout "$START_TIMEOUT"; then
	show_server_log
	die "the running container failed its checks"
fi
SERVER_PID=$(<"$TMP/server.pid")
START_SECS=$(since "$T_RUN")

if bah run --isolation chroot --network host -e "MAILROOM_PORT=$port" "$CTR" -- "${healthcheck[@]}" \
	>"$TMP/healthcheck.log" 2>&1; then
	echo "  ok: the image's HEALTHCHECK command succeeds against the running server"
else
	sed 's/^/   /' "$TMP/healthcheck.log" | redact
	die "the image's HEALTHCHECK command failed"
fi

stop_server
SQLITE_STOP_SECS=$STOP_SECS
python3 "$HELPERS/smoke.py" db --data "$data"
check_no_traceback

# ------------------------------------------------------------------------- 5. postgres
# The same image and the same container, unchanged: only the environment differs.
T_PG=$EPOCHREALTIME
VENV_PY=$ROOT/.venv/bin/python # asyncpg, the service's cipher, tests/servers/postgres.py
if ! "$VENV_PY" -c 'import asyncpg, pytest, service' >/dev/null 2>&1; then
	log "5. postgres: making the project's .venv (scripts/venv.sh test)"
	if ! in_background bash "$ROOT/scripts/venv.sh" test >"$TMP/venv.log" 2>&1; then
		tail -n 20 "$TMP/venv.log" | redact | sed 's/^/   /'
		die "scripts/venv.sh test failed"
	fi
fi
show_pg_log() { # what the database holder said since the last call
	tail -n "+$((PG_LOG_SHOWN + 1))" "$TMP/postgres.log" | redact
	PG_LOG_SHOWN=$(wc -l <"$TMP/postgres.log")
}
log "5. postgres: a fresh database on the suite's PostgreSQL server, the same image"
pg_state=$TMP/postgres.json
# Holds a fresh database until TERM (or until this shell is gone), then drops it.
"$VENV_PY" "$HELPERS/pg_database.py" hold --state "$pg_state" --parent-pid $$ \
	>"$TMP/postgres.log" 2>&1 9>&- &
PG_PID=$!
for ((i = 0; i < PG_TIMEOUT * 10; i++)); do
	[[ -s $pg_state ]] && break
	kill -0 "$PG_PID" 2>/dev/null || break
	sleep 0.1
done
if [[ ! -s $pg_state ]]; then
	show_pg_log
	kill -0 "$PG_PID" 2>/dev/null || die "could not get a PostgreSQL database"
	die "no PostgreSQL database within ${PG_TIMEOUT}s"
fi
mapfile -t pg_info < <(python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))
print(s["dsn"]); print(s["database"])' "$pg_state")
pg_dsn=${pg_info[0]} pg_name=${pg_info[1]}
show_pg_log
PG_SETUP_SECS=$(since "$T_PG")

T_PG_RUN=$EPOCHREALTIME
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
secret_key=$(python3 -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())')
pg_data=$TMP/data-pg # mounted over /data as in 4.; with PostgreSQL nothing may land there
install -d -o "$uid" -g "$uid" -m 0700 "$pg_data"
pg_env=(-e "MAILROOM_PORT=$port" -e "MAILROOM_API_KEYS=$api_key" -e "MAILROOM_ALLOWED_NETWORKS=127.0.0.0/8"
	-e "MAILROOM_DATABASE=$pg_dsn" -e "MAILROOM_SECRET_KEY=$secret_key")
log "   buildah run --isolation chroot (host network) -- ${cmd[*]}  [port $port, MAILROOM_DATABASE=postgresql://.../$pg_name, MAILROOM_SECRET_KEY generated, /data = empty temp dir]"
SERVER_LOG=$TMP/server-pg.log
buildah "${STORE[@]}" run --isolation chroot --network host -v "$pg_data:/data" "${pg_env[@]}" \
	"$CTR" -- "${cmd[@]}" >"$SERVER_LOG" 2>&1 9>&- &
RUN_PID=$!
if ! in_background python3 "$HELPERS/smoke.py" postgres --port "$port" --api-key="$api_key" \
	--data "$pg_data" --uid "$uid" --runner-pid "$RUN_PID" --pid-file "$TMP/server.pid" \
	--out "$TMP/postgres-smoke.json" --timeout "$START_TIMEOUT"; then
	show_server_log
	die "the running container failed its checks against PostgreSQL"
fi
SERVER_PID=$(<"$TMP/server.pid")
PG_START_SECS=$(since "$T_PG_RUN")
stop_server
PG_STOP_SECS=$STOP_SECS
MAILROOM_SECRET_KEY=$secret_key in_background "$VENV_PY" "$HELPERS/pg_database.py" rows \
	--state "$pg_state" --smoke "$TMP/postgres-smoke.json" ||
	die "what the container stored in PostgreSQL is not what the API was given"
check_no_traceback

# Drop the database now, to see it done (cleanup() would do it on any exit).
kill -TERM "$PG_PID"
for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
	kill -0 "$PG_PID" 2>/dev/null || break
	sleep 0.1
done
pg_rc=0
if kill -0 "$PG_PID" 2>/dev/null; then
	show_pg_log
	die "the database holder did not finish within ${STOP_TIMEOUT}s of SIGTERM"
fi
wait "$PG_PID" || pg_rc=$?
PG_PID=''
show_pg_log
((pg_rc == 0)) || die "the database $pg_name could not be dropped (exit $pg_rc)"
echo "  ok: database $pg_name dropped"

# ------------------------------------------------------------------------- summary
size=$(bah images --format '{{.Size}}' "$IMAGE" | head -1)
base_size=$(bah images --format '{{.Size}}' "$BASE_IMAGE" | head -1)
log "summary: image $IMAGE $size (base $BASE_IMAGE $base_size, /opt/venv $VENV_SIZE)"
log "summary: base ${BASE_SECS}s ($BASE_HOW), build ${BUILD_SECS}s, start+checks ${START_SECS}s, stop ${SQLITE_STOP_SECS}s"
log "summary: postgres: database ${PG_SETUP_SECS}s, start+checks ${PG_START_SECS}s, stop ${PG_STOP_SECS}s, on $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["where"])' "$pg_state")"
log "inspect: buildah --storage-driver vfs --root $STORAGE --runroot $RUNROOT images"
