#!/usr/bin/env bash
# Installs what pgfleet needs on a fresh Debian/Ubuntu machine: the
# PostgreSQL server binaries (initdb, pg_ctl) used by the throwaway clusters
# of the test kit. Idempotent: does nothing when they are already there.
set -euo pipefail

have_initdb() {
  [ -n "${PGFLEET_PG_BIN:-}" ] && [ -x "${PGFLEET_PG_BIN}/initdb" ] && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
  command -v initdb >/dev/null 2>&1
}

if ! have_initdb; then
  echo "setup: PostgreSQL server binaries not found; installing the postgresql package" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  have_initdb || { echo "setup: postgresql installed but initdb still not found" >&2; exit 1; }
fi

# The TLS tests make an RSA key in PKCS#1 form with the openssl tool.
if ! command -v openssl >/dev/null 2>&1; then
  echo "setup: openssl not found; installing it" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl >/dev/null
fi

# The pooler tests run a real PgBouncer (Debian's package) in front of the
# throwaway clusters.
have_pgbouncer() {
  [ -n "${PGFLEET_PGBOUNCER:-}" ] && [ -x "${PGFLEET_PGBOUNCER}" ] && return 0
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}
if ! have_pgbouncer; then
  echo "setup: pgbouncer not found; installing the pgbouncer package" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pgbouncer >/dev/null
  have_pgbouncer || { echo "setup: pgbouncer installed but not found" >&2; exit 1; }
  # The package starts a system service on port 6432; the tests start their own.
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now pgbouncer >/dev/null 2>&1 || true; fi
  $SUDO service pgbouncer stop >/dev/null 2>&1 || true
fi
