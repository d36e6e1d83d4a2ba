#!/usr/bin/env bash
# The main job: installs PostgreSQL if missing, builds pgfleet, and serves the
# multi-user memory API (default http://127.0.0.1:8080). With no database
# configured (no DATABASE_URL, no --config), it runs on a throwaway local
# PostgreSQL cluster removed when the server stops. Arguments go to
# `pgfleet serve` (e.g. --listen 127.0.0.1:9000, --config examples/config).
# Stop it with Ctrl-C: in-flight requests finish, connections close.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p pgfleet-cli
exec ./target/release/pgfleet serve "$@"
