#!/usr/bin/env python3
"""The table of an interleaved A/B benchmark run (before_after.sh,
trust_cost.sh): medians per workload and figure, the ratio, and every run.

Usage: summary.py RESULTS.jsonl FIELD A B
  each line: {"round":…, "workload":…, FIELD: A|B, "r": <bench --json report>}
"""
import json
import statistics
import sys

FIGURES = [
    ("W1", "deliveries_per_sec", None, "deliveries/s", 1e6),
    ("W1", "latency_us", "p99", "p99 latency ms", 1e3),
    ("W1", "server_cpu_pct", None, "server CPU %", 1),
    ("W1", "server_us_per_delivery", None, "server µs/delivery", 1),
    ("W1", "gen_us_per_msg", None, "generator µs/message", 1),
    ("W2", "latency_us", "p99", "p99 latency ms", 1e3),
    ("W2", "server_cpu_pct", None, "server CPU %", 1),
    ("W3-64", "publish_per_sec", None, "acked/s", 1e3),
    ("W3-64", "ack_us", "p99", "ack p99 ms", 1e3),
    ("W3-256", "publish_per_sec", None, "acked/s", 1e3),
    ("W3-256", "ack_us", "p99", "ack p99 ms", 1e3),
    ("W5", "latency_us", "p99", "p99 latency ms", 1e3),
    ("L100", "latency_us", "p99", "p99 latency ms", 1e3),
    ("L100", "server_cpu_pct", None, "server CPU %", 1),
    ("L100", "server_us_per_delivery", None, "server µs/delivery", 1),
    ("L100", "ack_us", "p50", "ack p50 ms", 1e3),
    ("W7", "latency_us", "p99", "p99 latency ms", 1e3),
    ("W7", "ack_us", "p50", "ack p50 ms", 1e3),
    ("W7", "ack_us", "p99", "ack p99 ms", 1e3),
    ("W7", "delivered_pct", None, "delivered/owed %", 1),
    ("W7", "server_cpu_pct", None, "server CPU %", 1),
    ("W7", "server_us_per_delivery", None, "server µs/delivery", 1),
]


def main():
    path, field, a, b = sys.argv[1:5]
    runs = [json.loads(line) for line in open(path) if line.strip()]

    def vals(w, which, key, sub):
        out = []
        for r in runs:
            if r["workload"] == w and r[field] == which and r["r"]:
                v = r["r"].get(key)
                if sub is not None and isinstance(v, dict):
                    v = v.get(sub)
                if isinstance(v, (int, float)):
                    out.append(v)
        return out

    print(f"\n| workload | figure | {a} (median) | {b} (median) | {b}/{a} | all runs {a} / {b} |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for w, key, sub, name, scale in FIGURES:
        xa, xb = vals(w, a, key, sub), vals(w, b, key, sub)
        if not xa and not xb:
            continue
        ma = statistics.median(xa) if xa else float("nan")
        mb = statistics.median(xb) if xb else float("nan")
        unit = {1e6: "M", 1e3: "k", 1: ""}[scale] if "ms" not in name else ""
        fmt = lambda xs: ", ".join(f"{x / scale:.2f}" for x in xs)
        ratio = mb / ma if ma else float("nan")
        print(f"| {w} | {name} | {ma / scale:.2f}{unit} | {mb / scale:.2f}{unit} | {ratio:.2f} | {fmt(xa)} / {fmt(xb)} |")


if __name__ == "__main__":
    main()
