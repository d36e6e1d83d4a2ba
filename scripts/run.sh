#!/usr/bin/env bash
# The main job: installs PostgreSQL if missing, checks the example
# configuration, then runs the quickstart (5 users x 3 stores on one pool).
# Uses DATABASE_URL when set; otherwise a throwaway local cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p pgfleet-cli -p pgfleet --examples --bins
echo "== pgfleet config check --config examples/config"
./target/release/pgfleet config check --config examples/config
echo
echo "== quickstart"
./target/release/examples/quickstart
