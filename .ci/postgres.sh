#!/usr/bin/env bash
# Throwaway PostgreSQL server for the test suite (audit log tests marked `postgres`).
#
# Why: the audit log must behave the same on SQLite and on PostgreSQL, so CI runs
# its tests against a real server.  This script gives CI one, without touching any
# system cluster: it installs the Debian packages if they are missing, initialises
# a private cluster in a temporary directory owned by the `postgres` user, starts
# it on 127.0.0.1 on a free port, creates a role and a database, and writes the
# connection URL to an env file the caller sources.
#
# Usage:
#   .ci/postgres.sh [start] [ENV_FILE]   start (or reuse) the server; prints the URL
#   .ci/postgres.sh stop    [ENV_FILE]   stop it and delete its data directory
#
# ENV_FILE defaults to $QANA_PG_ENV_FILE or /tmp/qana-postgres.env.  It contains
#   export QANA_TEST_POSTGRES_URL='postgresql+psycopg2://qana:...@127.0.0.1:PORT/qana_test'
# (plus QANA_PG_WORKDIR, QANA_PG_DATADIR, QANA_PG_BINDIR, QANA_PG_PORT used by `stop`).
# stdout carries only the URL; progress goes to stderr.
#
# `start` is idempotent: if the env file points at a server that answers, it is
# reused; if it points at a dead one (reboot, wiped /tmp), that is cleaned up and a
# new server is started.  The cluster runs with fsync off: it is disposable.
set -euo pipefail

log() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

action=start
case "${1:-}" in
    start|stop) action=$1; shift ;;
esac
env_file=${1:-${QANA_PG_ENV_FILE:-/tmp/qana-postgres.env}}
case "$env_file" in /*) ;; *) env_file="$PWD/$env_file" ;; esac
base_dir=${QANA_PG_BASEDIR:-/tmp}
db_name=qana_test
db_user=qana

# Commands run from / so the postgres user never trips over an unreadable cwd.
cd /

if [ "$(id -u)" -eq 0 ]; then
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

find_bindir() {
    # Highest installed major version (the glob sorts 10 before 9, so compare numbers).
    local dir version best="" best_version=0
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] || continue
        version=$(basename "$(dirname "$dir")")
        case "$version" in *[!0-9]*) continue ;; esac
        if [ "$version" -gt "$best_version" ]; then best=$dir; best_version=$version; fi
    done
    printf '%s' "$best"
}

install_postgresql() {
    [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    command -v apt-get >/dev/null || die "PostgreSQL is not installed and apt-get is not available"
    log "installing PostgreSQL from Debian packages"
    # Do not let the package create and start its own 'main' cluster on port 5432.
    mkdir -p /etc/postgresql-common/createcluster.d
    printf 'create_main_cluster = false\n' >/etc/postgresql-common/createcluster.d/qana-ci.conf
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
}

# True when something already accepts TCP connections on 127.0.0.1:$1.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

server_alive() {
    # Sourced in a subshell so a stale file cannot leak variables into this one.
    (
        # shellcheck disable=SC1090
        . "$env_file"
        [ -n "${QANA_PG_DATADIR:-}" ] && [ -d "$QANA_PG_DATADIR" ] || exit 1
        as_pg "$QANA_PG_BINDIR/pg_ctl" -D "$QANA_PG_DATADIR" status >/dev/null 2>&1 || exit 1
        "$QANA_PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$QANA_PG_PORT" -d "$db_name" -U "$db_user" || exit 1
    )
}

stop_server() {
    [ -f "$env_file" ] || { log "nothing to stop ($env_file does not exist)"; return 0; }
    (
        # shellcheck disable=SC1090
        . "$env_file"
        if [ -n "${QANA_PG_DATADIR:-}" ] && [ -f "$QANA_PG_DATADIR/postmaster.pid" ]; then
            as_pg "$QANA_PG_BINDIR/pg_ctl" -D "$QANA_PG_DATADIR" -m fast -w stop >/dev/null 2>&1 || true
        fi
        if [ -n "${QANA_PG_WORKDIR:-}" ] && [ -d "$QANA_PG_WORKDIR" ]; then
            rm -rf "$QANA_PG_WORKDIR"
            log "stopped the server and removed $QANA_PG_WORKDIR"
        fi
    )
    rm -f "$env_file"
}

start_server() {
    if [ -f "$env_file" ]; then
        if server_alive; then
            log "reusing the running server from $env_file"
            # shellcheck disable=SC1090
            (. "$env_file"; printf '%s\n' "$QANA_TEST_POSTGRES_URL")
            return 0
        fi
        log "$env_file points at a server that is gone; starting a new one"
        stop_server
    fi

    # Globals, not locals: the EXIT trap below needs them.
    bindir=$(find_bindir)
    if [ -z "$bindir" ]; then
        install_postgresql
        bindir=$(find_bindir)
        [ -n "$bindir" ] || die "PostgreSQL was installed but no initdb found under /usr/lib/postgresql"
    fi
    if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi

    workdir=$(mktemp -d "$base_dir/qana-pg.XXXXXX")
    datadir="$workdir/data"
    # On any failure from here on, leave nothing half-started behind.
    trap 'as_pg "$bindir/pg_ctl" -D "$datadir" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$workdir"' EXIT
    chmod 0755 "$workdir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$workdir"; fi

    password=$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)
    pwfile="$workdir/pwfile"
    (umask 077; printf '%s\n' "$password" >"$pwfile")
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$pwfile"; fi

    log "initialising a cluster in $datadir ($bindir)"
    as_pg "$bindir/initdb" -D "$datadir" -U postgres --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-locale --no-sync >"$workdir/initdb.log" 2>&1 \
        || { cat "$workdir/initdb.log" >&2; die "initdb failed"; }
    rm -f "$pwfile"
    cat >>"$datadir/postgresql.conf" <<EOF
# qana CI: disposable test cluster
listen_addresses = '127.0.0.1'
unix_socket_directories = '$datadir'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF

    port=""
    for attempt in $(seq 1 40); do
        candidate=$((20000 + (RANDOM * 32768 + RANDOM) % 30000))
        port_busy "$candidate" && continue
        # 9>&-: the server daemon must not inherit (and hold forever) this script's lock.
        if as_pg "$bindir/pg_ctl" -D "$datadir" -l "$workdir/server.log" -w -t 60 \
            -o "-p $candidate" start >/dev/null 2>&1 9>&-; then
            port=$candidate
            break
        fi
        # Lost a race for the port (or another failure): try again unless it is not a port problem.
        grep -q 'could not bind\|Address already in use' "$workdir/server.log" 2>/dev/null \
            || { cat "$workdir/server.log" >&2 2>/dev/null || true; die "the server did not start"; }
    done
    [ -n "$port" ] || die "no free port found for PostgreSQL"

    as_pg "$bindir/psql" -q -h "$datadir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE $db_user LOGIN PASSWORD '$password'" \
        -c "CREATE DATABASE $db_name OWNER $db_user" >&2

    url="postgresql+psycopg2://$db_user:$password@127.0.0.1:$port/$db_name"
    (
        umask 077
        cat >"$env_file.tmp" <<EOF
export QANA_TEST_POSTGRES_URL='$url'
export QANA_PG_WORKDIR='$workdir'
export QANA_PG_DATADIR='$datadir'
export QANA_PG_BINDIR='$bindir'
export QANA_PG_PORT='$port'
EOF
        mv "$env_file.tmp" "$env_file"
    )
    trap - EXIT
    log "PostgreSQL $("$bindir/postgres" -V | awk '{print $3}') listening on 127.0.0.1:$port; URL in $env_file"
    printf '%s\n' "$url"
}

# Two CI steps calling this at once must not both start a server for one env file.
if command -v flock >/dev/null; then
    exec 9>"$env_file.lock"
    flock 9
fi

case "$action" in
    start) start_server ;;
    stop) stop_server ;;
esac
