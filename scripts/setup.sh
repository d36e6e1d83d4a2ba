#!/usr/bin/env bash
# Installs what pgfleet needs on a fresh Debian/Ubuntu machine: the
# PostgreSQL server binaries (initdb, pg_ctl) used by the throwaway clusters
# of the test kit, openssl for the TLS tests and pgbouncer for the pooler
# tests. Idempotent: does nothing when they are already there.
set -euo pipefail

# Installs Debian packages, with sudo when not root.
install_packages() {
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

have_initdb() {
  [ -n "${PGFLEET_PG_BIN:-}" ] && [ -x "${PGFLEET_PG_BIN}/initdb" ] && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
  command -v initdb >/dev/null 2>&1
}

if ! have_initdb; then
  echo "setup: PostgreSQL server binaries not found; installing the postgresql package" >&2
  install_packages postgresql
  have_initdb || { echo "setup: postgresql installed but initdb still not found" >&2; exit 1; }
fi

# The TLS tests make an RSA key in PKCS#1 form with the openssl tool.
if ! command -v openssl >/dev/null 2>&1; then
  echo "setup: openssl not found; installing it" >&2
  install_packages openssl
fi

# The pooler tests run a real PgBouncer (Debian's package) in front of the
# throwaway clusters.
have_pgbouncer() {
  [ -n "${PGFLEET_PGBOUNCER:-}" ] && [ -x "${PGFLEET_PGBOUNCER}" ] && return 0
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}
if ! have_pgbouncer; then
  echo "setup: pgbouncer not found; installing the pgbouncer package" >&2
  install_packages pgbouncer
  have_pgbouncer || { echo "setup: pgbouncer installed but not found" >&2; exit 1; }
  # The package may start a system service on port 6432; the tests start
  # their own.
  service pgbouncer stop >/dev/null 2>&1 || true
fi
