#!/usr/bin/env bash
# The main job: installs PostgreSQL if missing, checks the example
# configuration, then runs `pgfleet demo --compare`: the original
# "too many clients" incident with per-store pools, and the fleet holding
# under the same load. Uses DATABASE_URL when set; otherwise a throwaway
# local cluster (max_connections=30). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p pgfleet-cli
echo "== pgfleet config check --config examples/config"
./target/release/pgfleet config check --config examples/config
echo
echo "== pgfleet demo --compare $*"
./target/release/pgfleet demo --compare "$@"
