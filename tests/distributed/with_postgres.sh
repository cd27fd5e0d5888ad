#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1, run a command with QSWEEP_TEST_PG_URL set, stop it.
#   tests/distributed/with_postgres.sh .venv/bin/python -m pytest -q -m distributed
# Installs Debian's postgresql package when the server binaries are missing (needs root or sudo).
set -euo pipefail

find_bin() {
  command -v initdb >/dev/null 2>&1 && { dirname "$(readlink -f "$(command -v initdb)")"; return; }
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

BIN=$(find_bin)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  BIN=$(find_bin)
fi

DIR=$(mktemp -d /tmp/qsweep-pg.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# PostgreSQL refuses to run as root: run it as the postgres user when we are root.
AS=()
if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; AS=(runuser -u postgres --); fi

"${AS[@]}" "$BIN/initdb" -D "$DIR/data" -A trust -U qsweep >/dev/null
"${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
  -o "-h 127.0.0.1 -p $PORT -k $DIR -c max_connections=100" start >/dev/null
trap '"${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null; rm -rf "$DIR"' EXIT
"$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U qsweep qsweep

echo "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT" >&2
QSWEEP_TEST_PG_URL="postgresql://qsweep@127.0.0.1:$PORT/qsweep" "$@"
