"""Soak: a steady stream of commands for a long time, with Centrifugo stopped and started twice
and a partition worker SIGKILLed twice (PostgreSQL then restarts every backend), and a report of
what matters for a long-running production: commands lost (must be 0), duplicates that reached a
subscriber, the outbox's dead tuples (peak and final), and each worker's memory at start and end.

Between the workers and Centrifugo sits a forwarding proxy (tests/harness/fault_double.py) that
records which commands Centrifugo acknowledged, so a command counts as delivered only when
Centrifugo said so; "lost" = committed by a writer and never acknowledged. A writer's batch whose
COMMIT was cut by the crash restart is "unknown" and left out of the count (it may or may not
have committed; if it did, it was delivered like the rest).

Usage: python3 bench/soak.py [--minutes 30] [--rate 2000] [--partitions 4]
Writes bench/soak-report.md (and prints it). Not part of CI: it takes --minutes."""

import argparse
import datetime
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from harness.centrifugo import Centrifugo  # noqa: E402
from harness.fault_double import FaultDouble  # noqa: E402
from harness.pg import PgCluster  # noqa: E402
from harness.subscriber import Subscriber  # noqa: E402


def rss_kib(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return None


def worker_memory(pg):
    rows = pg.sql("SELECT pid, backend_type FROM pg_stat_activity WHERE backend_type LIKE 'centrifugo_outbox partition %' ORDER BY 2")
    return {name: (pid, rss_kib(pid, "RssAnon"), rss_kib(pid)) for pid, name in rows}


def main():
    cleanup = []
    try:
        return soak(cleanup)
    finally:
        for close in reversed(cleanup):
            try:
                close()
            except Exception:
                pass


def soak(cleanup):
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=int, default=2000, help="commands per second")
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()
    duration = args.minutes * 60
    tick = 0.1
    per_tick = max(1, int(args.rate * tick))

    centrifugo = Centrifugo().start()
    cleanup.append(centrifugo.stop)
    proxy = FaultDouble(centrifugo.api_url).start()
    cleanup.append(proxy.stop)
    acked = set()
    acked_lock = threading.Lock()

    def record_acks(request, status, body):
        if status == 200:
            replies = json.loads(body).get("replies", [])
            with acked_lock:
                for command, reply in zip(request["body"]["commands"], replies):
                    if "error" not in reply:
                        data = command["publish"]["data"]
                        acked.add((data["w"], data["s"]))

    proxy.script = lambda request: ("observe", record_acks)
    proxy.keep_requests = False   # hours of requests would fill the memory
    pg = PgCluster({"centrifugo.api_url": proxy.api_url, "centrifugo.api_key": centrifugo.api_key,
                    "centrifugo.num_partitions": args.partitions, "centrifugo.retry_backoff_max": 1000,
                    "centrifugo.partition_select_limit": 1000}).init()
    cleanup.append(pg.destroy)
    pg.start()
    pg.sql("CREATE EXTENSION centrifugo_outbox")
    channels = [f"chat:soak{p}" for p in range(args.partitions)]
    sub = Subscriber(centrifugo, channels=channels).start()
    cleanup.append(sub.stop)
    stop = threading.Event()
    cleanup.append(stop.set)
    committed, unknown = [], []   # (writer, seq) of batches whose COMMIT returned / was cut
    dead_tuples = []

    def writer():
        seq = 0
        conn = None
        while not stop.is_set():
            started = time.monotonic()
            batch = [(0, s) for s in range(seq, seq + per_tick)]
            seq += per_tick
            try:
                if conn is None:
                    conn = pg.connect(autocommit=False)
                conn.execute("SELECT count(centrifugo_publish('chat:soak' || mod(s, %s), jsonb_build_object('w', 0, 's', s), "
                             "partition => mod(s, %s))) FROM generate_series(%s::int, %s::int) s",
                             (args.partitions, args.partitions, batch[0][1], batch[-1][1]))
                conn.commit()
                committed.extend(batch)
            except Exception:
                unknown.extend(batch)
                try:
                    conn.close()
                except Exception:
                    pass
                conn = None
                time.sleep(0.5)
            time.sleep(max(0.0, tick - (time.monotonic() - started)))

    def sampler():
        while not stop.is_set():
            try:
                dead_tuples.append(pg.scalar("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'centrifugo_outbox'") or 0)
            except Exception:
                pass
            stop.wait(5)

    time.sleep(2)
    memory_start = worker_memory(pg)
    threads = [threading.Thread(target=writer), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    events = []
    begin = time.monotonic()
    schedule = [(0.2, "centrifugo"), (0.4, "kill"), (0.6, "centrifugo"), (0.8, "kill")]
    for fraction, what in schedule:
        while time.monotonic() - begin < fraction * duration:
            time.sleep(1)
        if what == "centrifugo":
            centrifugo.stop()
            time.sleep(min(30, duration * 0.05))
            centrifugo.start()
            events.append(f"{time.monotonic() - begin:.0f} s: Centrifugo stopped for {min(30, duration * 0.05):.0f} s, started again")
        else:
            pid = pg.scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'centrifugo_outbox partition 0'")
            os.kill(pid, signal.SIGKILL)
            events.append(f"{time.monotonic() - begin:.0f} s: partition 0 worker (pid {pid}) SIGKILLed")
    while time.monotonic() - begin < duration:
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    drain_deadline = time.monotonic() + 120
    while pg.scalar("SELECT count(*) FROM centrifugo_outbox") and time.monotonic() < drain_deadline:
        time.sleep(1)
    time.sleep(2)
    memory_end = worker_memory(pg)
    final_dead = pg.scalar("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'centrifugo_outbox'") or 0
    left = pg.scalar("SELECT count(*) FROM centrifugo_outbox")
    with acked_lock:
        lost = [c for c in committed if c not in acked]
    received = [(p.data["w"], p.data["s"]) for p in sub.publications()]
    duplicates = len(received) - len(set(received))
    elapsed = time.monotonic() - begin

    lines = [
        "# Soak report", "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {elapsed / 60:.1f} minutes; "
        f"target {args.rate} commands/s over {args.partitions} partitions; 2-core VM, PostgreSQL 15, Centrifugo (memory engine)",
        f"- Commands committed: {len(committed)} ({len(committed) / elapsed:.0f}/s); batches cut by the crash restarts (unknown): {len(unknown)} commands",
        f"- **Commands lost** (committed, never acknowledged by Centrifugo): **{len(lost)}**",
        f"- Outbox rows left after the drain: {left}",
        f"- Duplicates that reached the subscriber: {duplicates} (of {len(received)} received; it misses what is published while Centrifugo is down)",
        f"- Outbox dead tuples: peak {max(dead_tuples or [0])}, final {final_dead} (sampled every 5 s)",
        "- Events: " + "; ".join(events),
        "", "| worker | RssAnon at start (KiB) | RssAnon at end (KiB) | VmRSS at start (KiB) | VmRSS at end (KiB) |", "|---|---|---|---|---|",
    ]
    for name in sorted(set(memory_start) | set(memory_end)):
        s, e = memory_start.get(name, (None, None, None)), memory_end.get(name, (None, None, None))
        lines.append(f"| {name} | {s[1]} | {e[1]} | {s[2]} | {e[2]} |")
    lines.append("")
    lines.append("Workers are new processes after each SIGKILL (PostgreSQL restarts every backend), so the "
                 "end figures are of processes started at the last kill.")
    report = "\n".join(lines) + "\n"
    print(report)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak-report.md"), "w") as f:
        f.write(report)
    return 1 if lost or left else 0


if __name__ == "__main__":
    sys.exit(main())
