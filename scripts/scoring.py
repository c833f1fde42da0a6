#!/usr/bin/env python3
"""Scoring against a running server (loopback): how prompt log-probs and /v1/score agree with
what generation and best-of-N compute, and what scoring costs. Prints
- /v1/score's reward-model values against best_of_n's for the same candidates (5 seeds × 4),
- 32 greedy tokens' logprobs against the same tokens' prompt log-probs (echo, max_tokens 0),
- medians over 15 alternated rounds with a 100-token prompt: completing 1 token after it,
  scoring it (echo + logprobs, max_tokens 0), and reading it as a response with /v1/score.
Needs `requests` (in the compat venv).

    python3 scripts/scoring.py http://127.0.0.1:8080
"""
import statistics
import sys
import time

import requests

URL = sys.argv[1]


def post(path, body):
    r = requests.post(URL + path, json=body, timeout=120)
    r.raise_for_status()
    return r.json()


def tokens(text, special=True):
    return post("/tokenize", {"prompt": text, "add_special_tokens": special})["tokens"]


def arm_parity():
    prompt = "Write one sentence about your weekend:"
    alignment = {"decoder": "best_of_n", "n": 4, "rewards": {"positive": 1}, "return_candidates": True}
    diffs = []
    for seed in range(1, 6):
        r = post("/v1/completions", {"prompt": prompt, "max_tokens": 10, "seed": seed,
                                     "ignore_eos": True, "alignment": alignment})
        for c in r["alignment"]["candidates"]:
            ids = tokens(c["text"], special=False)
            if len(ids) != c["tokens"]:
                continue  # the text does not give back its tokens
            s = post("/v1/score", {"prompt": prompt, "responses": [ids], "rewards": ["positive"]})
            diffs.append(abs(s["data"][0]["rewards"]["positive"]["score"] - c["scores"]["positive"]))
    print(f"/v1/score vs best_of_n (positive ARM): {len(diffs)} candidates, "
          f"max |diff| {max(diffs):.2g}, median {statistics.median(diffs):.2g} nats")


def teacher_forced():
    prompt = "The three primary colours are"
    ids = tokens(prompt)
    g = post("/v1/completions", {"prompt": ids, "max_tokens": 32, "temperature": 0,
                                 "logprobs": 1, "ignore_eos": True})
    full = tokens(prompt + g["choices"][0]["text"])
    if len(full) != len(ids) + 32:
        print("teacher forced: the answer retokenises to other tokens; skipped")
        return
    e = post("/v1/completions", {"prompt": full, "max_tokens": 0, "echo": True, "logprobs": 1})
    generated = g["choices"][0]["logprobs"]["token_logprobs"]
    scored = e["choices"][0]["logprobs"]["token_logprobs"][len(ids):]
    d = [abs(a - b) for a, b in zip(generated, scored)]
    print(f"generated vs prompt log-probs (32 tokens): max |diff| {max(d):.2g}, "
          f"median {statistics.median(d):.2g} nats")


def cost():
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 10)
    n = len(tokens(text))
    runs = {
        "complete 1 token": {"prompt": text, "max_tokens": 1, "temperature": 0},
        "echo + logprobs, max_tokens 0": {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1},
    }
    times = {k: [] for k in [*runs, "/v1/score"]}
    for _ in range(15):
        for name, body in runs.items():
            t = time.perf_counter()
            post("/v1/completions", body)
            times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        post("/v1/score", {"prompt": text[:40], "responses": [text[40:]]})
        times["/v1/score"].append(time.perf_counter() - t)
    base = statistics.median(times["complete 1 token"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{n}-token prompt, {name}: {m * 1000:.1f} ms ({m / base:.2f}×)")


if __name__ == "__main__":
    arm_parity()
    teacher_forced()
    cost()
