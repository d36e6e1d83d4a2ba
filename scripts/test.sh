#!/usr/bin/env bash
# Runs every test of the workspace (unit, integration against real
# throwaway PostgreSQL clusters, doc tests), installing PostgreSQL first if
# the machine has none.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace "$@"
