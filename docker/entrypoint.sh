#!/usr/bin/env bash
# Carnet container entrypoint.
#
#   api       migrate, then serve on 0.0.0.0:$PORT ($PORT defaults to 8000)
#   migrate   bring the schema to the newest migration and exit
#   worker    deliver the outbox to destinations and run imports (`carnet worker`)
#   other     run as given: `carnet token create --role admin --subject me@shop.example`, `bash`, ...
#
# api, migrate and worker need DATABASE_URL and JWT_SECRET (32+ characters). They wait up to
# $DB_WAIT_SECONDS (default 30) for the database's TCP port before starting.
set -euo pipefail

PORT="${PORT:-8000}"
HOST="${HOST:-0.0.0.0}"
DB_WAIT_SECONDS="${DB_WAIT_SECONDS:-30}"

log() { printf 'carnet-entrypoint: %s\n' "$*" >&2; }

require_config() {
  local missing=()
  [[ -n "${DATABASE_URL:-}" ]] || missing+=("DATABASE_URL (e.g. postgresql://carnet:secret@db:5432/carnet)")
  [[ -n "${JWT_SECRET:-}" ]] || missing+=("JWT_SECRET (32+ random characters, e.g. from: openssl rand -base64 48)")
  if ((${#missing[@]})); then
    for item in "${missing[@]}"; do log "missing environment variable: $item"; done
    log "the image never starts the embedded PostgreSQL; set both and retry"
    exit 78  # EX_CONFIG
  fi
  if ((${#JWT_SECRET} < 32)); then
    log "JWT_SECRET must be at least 32 characters long (it has ${#JWT_SECRET})"
    exit 78
  fi
}

# Wait for the database's TCP port so a container started alongside PostgreSQL does not fail on the
# first try. Only the host and port are parsed (with Python, already in the image); anything it cannot
# parse (a unix socket, several hosts) is left to the app to report.
wait_for_database() {
  [[ "$DB_WAIT_SECONDS" =~ ^[0-9]+$ ]] && ((DB_WAIT_SECONDS > 0)) || return 0
  local rc=0
  python - "$DB_WAIT_SECONDS" <<'PY' || rc=$?
import os, socket, sys, time
from urllib.parse import urlsplit

deadline = time.monotonic() + int(sys.argv[1])
try:
    url = urlsplit(os.environ["DATABASE_URL"])
    host, port = url.hostname, url.port or 5432
except ValueError:
    sys.exit(0)
if not host or "," in (url.netloc or ""):
    sys.exit(0)
while True:
    try:
        socket.create_connection((host, port), timeout=2).close()
        sys.exit(0)
    except OSError as exc:
        if time.monotonic() >= deadline:
            print(f"carnet-entrypoint: {host}:{port}: {exc}", file=sys.stderr)
            sys.exit(1)
        time.sleep(1)
PY
  case "$rc" in
    0) ;;
    1) log "the database did not accept connections within ${DB_WAIT_SECONDS}s"; exit 69 ;;  # EX_UNAVAILABLE
    *) log "could not check the database port (exit $rc); starting anyway" ;;
  esac
}

role="${1:-api}"
if (($#)); then shift; fi

case "$role" in
  api | serve)
    require_config
    wait_for_database
    # `carnet serve` runs the migrations itself before listening (a no-op when the compose `migrate`
    # service already ran them), so no separate `carnet migrate` step here.
    log "serving on ${HOST}:${PORT}"
    exec carnet serve --host "$HOST" --port "$PORT" "$@"
    ;;
  migrate)
    require_config
    wait_for_database
    exec carnet migrate "$@"
    ;;
  worker)
    require_config
    wait_for_database
    exec carnet worker "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
