#!/usr/bin/env python3
"""Fairness under mixed load, against a running server (loopback only, bounded):
8 streams decode; once they run, a ~4,000-token prompt arrives. Prints the streams' inter-token
gaps: the median while no long prompt is in (before it arrives and after its first token), and
the median and p99 while it is prefilled (from its arrival to its first token). Python's standard library only.

    python3 scripts/fairness.py http://127.0.0.1:8080 [--streams 8] [--prompt-words 4000]
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def stream(url, body, times, ready=None):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    for raw in r:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                times.append(time.perf_counter())
                if ready is not None and len(times) == 2:
                    ready.set()
    conn.close()


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=4000)
    ap.add_argument("--tokens", type=int, default=1500)
    args = ap.parse_args()
    per_stream = [[] for _ in range(args.streams)]
    started = [threading.Event() for _ in range(args.streams)]
    threads = [
        threading.Thread(
            target=stream,
            args=(args.url, {"prompt": f"Story {i}: once upon a time", "max_tokens": args.tokens,
                             "ignore_eos": True, "stream": True}, per_stream[i], started[i]),
        )
        for i in range(args.streams)
    ]
    for t in threads:
        t.start()
    for e in started:
        e.wait()
    time.sleep(0.5)
    long_times = []
    words = " ".join(["the", "city", "water", "house", "day"][i % 5] for i in range(args.prompt_words))
    arrive = time.perf_counter()
    stream(args.url, {"prompt": words, "max_tokens": 2, "stream": True}, long_times)
    first = long_times[0] if long_times else time.perf_counter()
    for t in threads:
        t.join()
    alone, during = [], []
    for ts in per_stream:
        for a, b in zip(ts, ts[1:]):
            (during if b >= arrive and a <= first else alone).append(b - a)
    med = statistics.median(alone)
    print(f"prefill of the long prompt: {first - arrive:.2f} s")
    print(f"inter-token gap without it: median {med*1000:.2f} ms ({len(alone)} gaps)")
    if during:
        print(f"during its prefill: median {statistics.median(during)*1000:.2f} ms, "
              f"p99 {pct(during, 0.99)*1000:.2f} ms, max {max(during)*1000:.2f} ms "
              f"({len(during)} gaps); p99 / median without it = {pct(during, 0.99)/med:.2f}")


if __name__ == "__main__":
    main()
