#!/usr/bin/env python3
"""Time to first token and aggregate decode speed of `firstrt serve` at 1, 4 and 16 concurrent
requests (Python standard library only).

    scripts/bench-serve.py [--model GGUF] [--firstrt BIN] [--levels 1,4,16] [--rounds 3]
                           [--max-tokens 64] [-- EXTRA SERVE ARGS]

Starts `firstrt serve` on a free port of 127.0.0.1 (with --max-concurrent the largest level),
then for each level and round sends that many streamed /v1/completions at once (the same
prompt, greedy, max_tokens tokens) and measures per request the time to the first text chunk
and the end. Prints a markdown table of medians over rounds:

- TTFT: the median request's time to first token (s), and the slowest's;
- aggregate decode tok/s: completion tokens of all requests / the round's wall time;
- per-sequence decode tok/s: (tokens - 1) / (end - first token), median over requests.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)


def stream_one(url, body, out, i):
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter()
    end = time.perf_counter()
    out[i] = {"ttft": (first or end) - t0, "end": end, "t0": t0, "first": first or end, "tokens": tokens}


def round_at(url, model, level, max_tokens, prompt):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    out = [None] * level
    threads = [threading.Thread(target=stream_one, args=(url, body, out, i)) for i in range(level)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if any(o is None for o in out):
        sys.exit("bench-serve: a request failed (see the server's stderr)")
    tokens = sum(o["tokens"] for o in out)
    per_seq = [(o["tokens"] - 1) / (o["end"] - o["first"]) for o in out if o["tokens"] > 1 and o["end"] > o["first"]]
    return {
        "ttft_median": statistics.median(o["ttft"] for o in out),
        "ttft_max": max(o["ttft"] for o in out),
        "aggregate_tok_s": tokens / wall,
        "per_seq_tok_s": statistics.median(per_seq) if per_seq else 0.0,
        "tokens": tokens,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.expanduser(os.environ.get("FIRSTRT_CACHE", "~/.cache/firstrt")) + "/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--firstrt", default=os.path.join(root, "target/release/firstrt"))
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="Once upon a time, in a small village by the sea, there lived")
    ap.add_argument("serve_args", nargs="*")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    cmd = [args.firstrt, "serve", "-m", args.model, "--port", "0", "--model-id", "bench",
           "--max-concurrent", str(max(levels)), "--queue", str(max(levels)), *args.serve_args]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            sys.exit(f"bench-serve: the server did not start: {' '.join(cmd)}")
        url = line.split()[-1]
        round_at(url, "bench", 1, 4, args.prompt)  # warm-up
        rows = []
        for level in levels:
            runs = [round_at(url, "bench", level, args.max_tokens, args.prompt) for _ in range(args.rounds)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append((level, med))
            print(f"level {level}: {json.dumps({k: round(v, 3) for k, v in med.items()})}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=60)
    load = os.getloadavg()
    print(f"`firstrt serve` on {args.model.split('/')[-1]}, prompt {args.prompt!r}, max_tokens {args.max_tokens}, "
          f"greedy, medians of {args.rounds} rounds, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    print("| concurrent requests | TTFT median (s) | TTFT slowest (s) | aggregate tok/s | per-sequence decode tok/s |")
    print("|---:|---:|---:|---:|---:|")
    for level, m in rows:
        print(f"| {level} | {m['ttft_median']:.2f} | {m['ttft_max']:.2f} | {m['aggregate_tok_s']:.1f} | {m['per_seq_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
