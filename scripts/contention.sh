#!/usr/bin/env bash
# Decode speed on a machine shared with a busy process: tilt and llama.cpp, each idle and beside
# NEIGHBOURS processes that spin (`yes`), rounds alternated, medians. The figures in
# docs/reliability.md come from it.
#
#   cargo build --release && scripts/contention.sh
#
# tilt: `tilt generate` of TOKENS tokens after a 5-token prompt (its tok/s counts the prompt);
# llama.cpp: `llama-bench -p 0 -n TOKENS` (decode only), same GGUF, same threads.
# Settings: ROUNDS [3], TOKENS [256], THREADS [all cores], NEIGHBOURS [1],
# TILT [target/release/tilt], LLAMA_BIN [built by scripts/llama-cpp.sh].
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
TOKENS=${TOKENS:-256}
THREADS=${THREADS:-$(nproc)}
NEIGHBOURS=${NEIGHBOURS:-1}
TILT=${TILT:-${CARGO_TARGET_DIR:-target}/release/tilt}
LLAMA_BIN=${LLAMA_BIN:-$(scripts/llama-cpp.sh)}
model=$("$TILT" fetch)

tilt() { # threads -> tok/s
    "$TILT" --threads "$1" generate --model "$model" --prompt "Once upon a time" \
        --max-tokens "$TOKENS" --ignore-eos --temperature 0 --alignment '{"decoder": "sample"}' \
        2>&1 >/dev/null | sed -n 's/.*(\([0-9.]*\) tok\/s.*/\1/p'
}
llama() { # threads -> tok/s
    "$LLAMA_BIN/llama-bench" -m "$model" -p 0 -n "$TOKENS" -t "$1" -r 1 -o json 2>/dev/null |
        python3 -c 'import json, sys; print(round(json.load(sys.stdin)[0]["avg_ts"], 1))'
}
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

neighbours=()
stop() { [[ ${#neighbours[@]} -eq 0 ]] || kill "${neighbours[@]}" 2>/dev/null || true; neighbours=(); }
trap stop EXIT
declare -A runs
for load in idle busy; do
    if [[ $load == busy ]]; then
        for ((i = 0; i < NEIGHBOURS; i++)); do yes >/dev/null & neighbours+=($!); done
        sleep 0.5
    fi
    for ((r = 0; r < ROUNDS; r++)); do
        runs[tilt-$load]+=" $(tilt "$THREADS")"
        runs[llama-$load]+=" $(llama "$THREADS")"
        runs[tilt1-$load]+=" $(tilt 1)"
    done
    stop
done

echo "decode tok/s, $THREADS threads unless named, $NEIGHBOURS busy neighbour(s), medians of $ROUNDS ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
echo
echo "| | idle | busy | busy ÷ idle |"
echo "|---|---|---|---|"
for who in tilt tilt1 llama; do
    idle=$(echo "${runs[$who-idle]}" | median)
    busy=$(echo "${runs[$who-busy]}" | median)
    name=$who; [[ $who == tilt1 ]] && name="tilt, 1 thread"; [[ $who == llama ]] && name="llama.cpp (llama-bench)"
    echo "| $name | $idle (${runs[$who-idle]# }) | $busy (${runs[$who-busy]# }) | $(python3 -c "print(f'{$busy / $idle:.2f}')") |"
done
