"""Draws the benchmark's plots from bench/results.json (written by bench/run.py):

- bench/throughput.png   drain rate per setting and side (median of the paired runs)
- bench/centrifugo_cpu.png   Centrifugo's CPU time per 100 000 commands per setting and side
- bench/latency_cdf.png  commit → subscriber latency at a steady rate, as a CDF per side

Usage: python3 bench/plot.py [results.json]   (needs matplotlib: pip install matplotlib)"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = {"http": "centrifugo_outbox, HTTP", "grpc": "centrifugo_outbox, gRPC",
          "builtin": "Centrifugo's PostgreSQL consumer", "per_command": "one command per request (strict_order)"}
COLORS = {"http": "#1f77b4", "grpc": "#2ca02c", "builtin": "#d62728", "per_command": "#7f7f7f"}


def sides_of(entries):
    return [s for s in LABELS if s in entries[0]]


def grouped_bars(entries, value, ylabel, title, path):
    sides = sides_of(entries)
    settings = [f"{e['layout']}\n{e['partitions']}p / {e['select_limit']}" for e in entries]
    width = 0.8 / len(sides)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(entries)), 4.8))
    for i, side in enumerate(sides):
        xs = [x + (i - (len(sides) - 1) / 2) * width for x in range(len(entries))]
        ax.bar(xs, [value(e[side]) for e in entries], width, label=LABELS[side], color=COLORS[side])
    ax.set_xticks(range(len(entries)), settings, fontsize=8)
    ax.set_xlabel("layout, partitions / partition_select_limit")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print("wrote", path)


def latency_cdf(latency, rate, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, result in latency.items():
        samples = sorted(result["all_ms"])
        n = len(samples)
        ax.plot(samples, [(i + 1) / n for i in range(n)], label=f"{LABELS[side]} (p50 {result['p50_ms']:.2f}, "
                f"p99 {result['p99_ms']:.2f} ms)", color=COLORS[side])
    ax.set_xscale("log")
    ax.set_xlabel("COMMIT → subscriber receives it (ms, log scale)")
    ax.set_ylabel("fraction of commands")
    ax.set_title(f"Commit → delivery latency at a steady {rate} commands/s")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print("wrote", path)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results.json")
    with open(path) as f:
        results = json.load(f)
    entries = results.get("throughput", [])
    if entries:
        grouped_bars(entries, lambda s: s["median_per_second"], "commands per second (median)",
                     f"Drain throughput, {results['rows']} commands, {results['machine']}",
                     os.path.join(HERE, "throughput.png"))
        grouped_bars(entries, lambda s: s["median_cpu_per_100k"]["centrifugo"], "Centrifugo CPU seconds per 100k commands",
                     "Centrifugo's CPU per delivered command", os.path.join(HERE, "centrifugo_cpu.png"))
    if results.get("latency"):
        rate = next(iter(results["latency"].values()))["rate_per_second"]
        latency_cdf(results["latency"], rate, os.path.join(HERE, "latency_cdf.png"))


if __name__ == "__main__":
    main()
