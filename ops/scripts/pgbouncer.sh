#!/usr/bin/env bash
# Start, run or stop a pgbouncer for the exchange (dev, tests, CI).
#   ops/scripts/pgbouncer.sh start RUN_DIR [LISTEN_PORT=6432] [PG_HOST=127.0.0.1] [PG_PORT=5432] [PG_USER=postgres]
#   ops/scripts/pgbouncer.sh run RUN_DIR [same arguments]
#   ops/scripts/pgbouncer.sh stop RUN_DIR
# PG_PASSWORD (environment, never an argument: the process list shows those): PG_USER's password for PostgreSQL, for a
# server that asks for one; written into the rendered config (mode 0600), quoted for pgbouncer's connection string.
# POOL_PASSWORD (environment too): the password pgbouncer's clients must give, as PG_USER (scram-sha-256); without it
# they give PG_USER's name alone (trust). Either way PG_USER is the only user pgbouncer admits (pgbouncer.users).
# Renders ops/pgbouncer.ini into RUN_DIR; `start` daemonizes and returns once it listens, `run` stays in the
# foreground (a supervisor's child: `exchange dev` restarts it when it dies). pgbouncer refuses to run as root, so
# as root it runs as the RUN_USER (default: postgres, which Debian's postgresql/pgbouncer packages create).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd=${1:?start|run|stop}; run_dir=${2:?RUN_DIR}
mkdir -p "$run_dir"; run_dir="$(cd "$run_dir" && pwd)"
bin="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
run_user=${RUN_USER:-postgres}

# pgbouncer's own files (config, pid, log, socket) live in RUN_DIR, unless RUN_DIR is one the run user cannot
# enter (as root, under /root or another 0700 directory): then in a fresh /tmp/exchange-pgbouncer-* directory,
# whose path RUN_DIR/pgbouncer.files records for stop (which removes it).
pointer="$run_dir/pgbouncer.files"

live_pid() {  # the pid in pid file $1 if a pgbouncer runs with it: not another process that got a killed one's pid,
    local pid comm state  # nor a killed one's zombie, which nobody may reap (a container's init)
    pid="$(cat "$1" 2>/dev/null || true)"
    [ -n "$pid" ] && read -r _ comm state _ 2>/dev/null < "/proc/$pid/stat" || return 0
    if [ "$comm" = "(pgbouncer)" ] && [ "$state" != Z ]; then echo "$pid"; fi
}

stop_run() {  # the pgbouncer of RUN_DIR, if one runs; then its stand-in directory, if it had one
    local files="$run_dir" pid
    if [ -f "$pointer" ]; then
        files="$(cat "$pointer")"
        case "$files" in /tmp/exchange-pgbouncer-*) ;; *) echo "pgbouncer: ignoring $pointer ($files)" >&2; files="$run_dir" ;; esac
    fi
    pid="$(live_pid "$files/pgbouncer.pid")"
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do [ -n "$(live_pid "$files/pgbouncer.pid")" ] || break; sleep 0.1; done
    fi
    rm -f "$files/pgbouncer.pid"
    if [ "$files" != "$run_dir" ]; then rm -rf "$files"; fi
    rm -f "$pointer"
}

render() {  # RUN_DIR's config into $files (RUN_DIR or a fresh stand-in directory), owned by the run user
    if [ -f "$pointer" ]; then stop_run; fi  # a stand-in directory is only ever used by one run
    files="$run_dir"
    if [ "$(id -u)" = 0 ] && ! runuser -u "$run_user" -- test -x "$run_dir" 2>/dev/null; then
        files="$(mktemp -d /tmp/exchange-pgbouncer-XXXXXX)"
        echo "$files" > "$pointer"
    fi
    local umask_was; umask_was="$(umask)"
    umask 077  # the rendered files hold passwords: pgbouncer's user's alone, from their first byte
    local auth_type=trust
    if [ -n "${POOL_PASSWORD:-}" ]; then auth_type=scram-sha-256; fi
    sed -e "s|@PG_HOST@|$pg_host|" -e "s|@PG_PORT@|$pg_port|" -e "s|@PG_USER@|$pg_user|g" \
        -e "s|@LISTEN_ADDR@|127.0.0.1|" -e "s|@LISTEN_PORT@|$port|" -e "s|@RUN_DIR@|$files|g" \
        -e "s|@AUTH_TYPE@|$auth_type|" "$here/pgbouncer.ini" > "$files/pgbouncer.ini"
    case "${POOL_PASSWORD:-}${PG_PASSWORD:-}" in
        *$'\n'*|*$'\r'*) echo "pgbouncer: POOL_PASSWORD or PG_PASSWORD holds a line break" >&2; exit 2 ;;
    esac
    # auth_file: "user" "password", a double quote doubled inside a field.
    local dq='"' pool_password="${POOL_PASSWORD:-}"
    printf '"%s" "%s"\n' "${pg_user//$dq/$dq$dq}" "${pool_password//$dq/$dq$dq}" > "$files/pgbouncer.users"
    if [ -n "${PG_PASSWORD:-}" ]; then
        # In single quotes, a quote doubled (pgbouncer's connection string); through the environment, so that awk
        # reads it verbatim (-v would expand backslashes).
        PW="'${PG_PASSWORD//\'/\'\'}'" awk '/^\* = host=/ { $0 = $0 " password=" ENVIRON["PW"] } { print }' \
            "$files/pgbouncer.ini" > "$files/pgbouncer.ini.new"
        mv "$files/pgbouncer.ini.new" "$files/pgbouncer.ini"
    fi
    chmod 600 "$files/pgbouncer.ini" "$files/pgbouncer.users"
    umask "$umask_was"
    # A pid file left by a pgbouncer that was killed (a crash, or SIGKILL to restart it) must not stop the next one.
    if [ -z "$(live_pid "$files/pgbouncer.pid")" ]; then rm -f "$files/pgbouncer.pid"; fi
    if [ "$(id -u)" = 0 ]; then chown -R "$run_user" "$files"; fi
}

run_as=(); if [ "$(id -u)" = 0 ]; then run_as=(runuser -u "$run_user" --); fi
port=${3:-6432}; pg_host=${4:-127.0.0.1}; pg_port=${5:-5432}; pg_user=${6:-postgres}
case "$cmd" in
run)
    render
    # As root, setpriv switches user and execs pgbouncer in this very process (a supervisor's child that it can
    # signal and wait for); switching user clears a parent-death signal, so it is set again after the switch.
    # runuser instead would stay pgbouncer's parent and hold every stop for two seconds.
    if [ "$(id -u)" = 0 ] && setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
        run_as=(setpriv --reuid "$run_user" --regid "$(id -g "$run_user")" --init-groups --pdeathsig TERM --)
    fi
    exec ${run_as[@]+"${run_as[@]}"} "$bin" "$files/pgbouncer.ini"  # (bash < 4.4: an empty array is unset)
    ;;
start)
    render
    ${run_as[@]+"${run_as[@]}"} "$bin" -d "$files/pgbouncer.ini"
    for _ in $(seq 1 50); do
        if pg_isready -q -h 127.0.0.1 -p "$port"; then echo "pgbouncer: listening on 127.0.0.1:$port"; exit 0; fi
        sleep 0.1
    done
    echo "pgbouncer: did not start; log:" >&2; cat "$files/pgbouncer.log" >&2 || true; exit 1
    ;;
stop)
    stop_run
    ;;
*) echo "usage: $0 start|run|stop RUN_DIR ..." >&2; exit 2 ;;
esac
