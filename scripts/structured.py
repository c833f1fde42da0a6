#!/usr/bin/env python3
"""What structured output costs, against a running server (loopback): the same chat requests
with and without a JSON schema (`response_format`), alternated, one at a time. Prints the
medians of output tokens/s and of time per output token, and their difference per token (the
mask's cost, computed on the engine's threads before each draw). Needs `requests`.

    python3 scripts/structured.py http://127.0.0.1:8080 [--rounds 10] [--n 1]
"""
import argparse
import statistics
import time

import requests

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 6},
        "bio": {"type": "string", "maxLength": 300},
    },
    "required": ["name", "age", "hobbies", "bio"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--n", type=int, default=1)
    args = ap.parse_args()
    base = {"messages": [{"role": "user", "content": "Invent a person: name, age, hobbies and a short bio."}],
            "max_tokens": 128, "temperature": 0.7, "n": args.n}
    kinds = {
        "free": base,
        "json_schema": {**base, "response_format": {"type": "json_schema",
                                                    "json_schema": {"name": "person", "schema": SCHEMA}}},
    }
    per_token = {k: [] for k in kinds}
    rate = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind, body in kinds.items():
            t = time.perf_counter()
            reply = requests.post(args.url + "/v1/chat/completions", json={**body, "seed": r}, timeout=300)
            reply.raise_for_status()
            secs = time.perf_counter() - t
            tokens = reply.json()["usage"]["completion_tokens"]
            per_token[kind].append(secs / tokens * 1000)
            rate[kind].append(tokens / secs)
    for kind in kinds:
        print(f"{kind:12} {statistics.median(rate[kind]):7.1f} output tok/s, "
              f"{statistics.median(per_token[kind]):.2f} ms per output token (n = {args.n})")
    extra = statistics.median(per_token["json_schema"]) - statistics.median(per_token["free"])
    print(f"the schema adds {extra:.2f} ms per output token")


if __name__ == "__main__":
    main()
