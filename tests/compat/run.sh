#!/usr/bin/env bash
# Tests against a live server from outside: the official `openai` Python client, schemathesis
# checking the server against openapi.yaml both ways (test_contract.py), lm-evaluation-harness
# running its tasks through tilt (test_lm_eval.py), LangChain's structured output
# (test_structured.py), and the playground in headless Chromium (test_playground.py: needs
# Debian's chromium and chromium-driver, which .ci/run installs). Installs `openai`, `pytest`,
# `schemathesis`, `lm-eval[api]`, `langchain-openai` and `selenium` from PyPI into a virtual
# environment, starts `tilt serve` on a free
# port, waits until it is ready, runs tests/compat, and stops the server. The server ends any
# request after 2 s (--request-timeout), so that generated requests for thousands of tokens stay
# cheap; the client tests ask for a few tokens each.
#
# Needs a release build (cargo build --release). Environment:
#   TILT_BIN          the tilt binary (default: $CARGO_TARGET_DIR or target, then release/tilt)
#   TILT_COMPAT_VENV  where to put the virtual environment (default: .venv/compat)
set -euo pipefail
cd "$(dirname "$0")/../.."

bin="${TILT_BIN:-${CARGO_TARGET_DIR:-target}/release/tilt}"
venv="${TILT_COMPAT_VENV:-.venv/compat}"
if [ ! -x "$bin" ]; then
    echo "run.sh: no tilt binary at $bin; run cargo build --release first" >&2
    exit 1
fi

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check openai pytest schemathesis==4.32.5 "lm-eval[api]==0.4.13" langchain-openai==1.8.1 selenium==4.51.0

out="$(mktemp)"
RUST_LOG="${RUST_LOG:-warn}" "$bin" serve --host 127.0.0.1 --port 0 --request-timeout 2 >"$out" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -f "$out"' EXIT

url=""
for _ in $(seq 300); do
    url="$(sed -n 's/^tilt: listening on //p' "$out")"
    [ -n "$url" ] && break
    kill -0 "$server" 2>/dev/null || { echo "run.sh: tilt serve exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "run.sh: tilt serve printed no address" >&2; exit 1; }

# Ready when /health answers 200 (503 while the model loads; the first run may fetch it).
"$venv/bin/python" - "$url" <<'EOF'
import sys, time, urllib.request, urllib.error

url = sys.argv[1] + "/health"
deadline = time.time() + 600
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                break
    except (urllib.error.URLError, ConnectionError):
        pass
    if time.time() > deadline:
        sys.exit(f"run.sh: {url} never answered 200")
    time.sleep(0.2)
EOF

TILT_URL="$url" TILT_BIN="$bin" PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest -q tests/compat
