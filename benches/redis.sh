#!/usr/bin/env bash
# Starts (or stops) the Redis server that `benches/peers.rs` compares against.
#
#   bash benches/redis.sh          # install redis-server if missing, start it
#   bash benches/redis.sh stop     # stop it
#   bash benches/redis.sh status   # say whether it answers
#
# The server listens on 127.0.0.1 only, on a non-default port (6399, or
# $SHMDICT_REDIS_PORT), with persistence off (no RDB snapshots, no AOF), so
# it never writes to disk and never clashes with a Redis already running on
# the default port 6379. The benchmark reads the same variable.
set -euo pipefail

PORT="${SHMDICT_REDIS_PORT:-6399}"
HOST=127.0.0.1

answers() {
    command -v redis-cli >/dev/null 2>&1 &&
        [ "$(redis-cli -h "$HOST" -p "$PORT" ping 2>/dev/null)" = PONG ]
}

install() {
    command -v redis-server >/dev/null 2>&1 && return 0
    echo "redis.sh: redis-server not found; installing Debian's redis-server package"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    # The package's own service (port 6379) is not needed: policy-rc.d
    # keeps it from starting where the package manager honours it.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq redis-server redis-tools
}

case "${1:-start}" in
start)
    install
    if answers; then
        echo "redis.sh: a Redis server already answers on $HOST:$PORT"
        exit 0
    fi
    redis-server --port "$PORT" --bind "$HOST" --save '' --appendonly no \
        --daemonize yes --logfile "/tmp/shmdict-bench-redis-$PORT.log" \
        --pidfile "/tmp/shmdict-bench-redis-$PORT.pid" --dir /tmp
    for _ in $(seq 50); do
        if answers; then
            echo "redis.sh: redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') answers on $HOST:$PORT"
            exit 0
        fi
        sleep 0.1
    done
    echo "redis.sh: redis-server did not answer on $HOST:$PORT; see /tmp/shmdict-bench-redis-$PORT.log" >&2
    exit 1
    ;;
stop)
    if answers; then
        redis-cli -h "$HOST" -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
        echo "redis.sh: stopped the server on $HOST:$PORT"
    else
        echo "redis.sh: no server answers on $HOST:$PORT"
    fi
    ;;
status)
    if answers; then echo "redis.sh: up on $HOST:$PORT"; else echo "redis.sh: down on $HOST:$PORT"; exit 1; fi
    ;;
*)
    echo "usage: $0 [start|stop|status]" >&2
    exit 2
    ;;
esac
