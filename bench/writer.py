"""Writer cost: what publishing from SQL costs the application's transactions (pgbench).

Three pgbench scripts, each a transaction that inserts a business row and one command:
  plain     -- INSERT into a plain table of the outbox's shape (no trigger, same index)
  insert    -- INSERT into centrifugo_outbox (wake-at-commit trigger included)
  function  -- SELECT centrifugo_publish(...)
run as a superuser (how a new user tries it) and as an application role with
centrifugo_publisher (how the README says to run it), 4 clients, 15 s each, with the workers
idle (pointed at a closed port, long back-off), alternating the scripts round after round.
The figures are each script's median TPS over the rounds and the median of its per-round
ratios to `plain` (each round runs the three scripts back to back).

Then the cost of one call, without pgbench and the client: each script's statement run
--calls times inside one statement (INSERT ... SELECT ... FROM generate_series, or
SELECT count(centrifugo_publish(...)) FROM generate_series), as the superuser and as the
application role, microseconds per row, median of the rounds.

Usage: python3 bench/writer.py [--rounds 3] [--seconds 15] [--clients 4] [--calls 50000]
Writes bench/writer-report.md (and prints it). Not part of CI."""

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from harness.pg import PG_BIN, PgCluster  # noqa: E402

SETUP = [
    "CREATE EXTENSION centrifugo_outbox",
    "CREATE TABLE business (id bigserial PRIMARY KEY, n int, note text)",
    """CREATE TABLE plain_outbox (id bigserial PRIMARY KEY, method text NOT NULL, payload jsonb NOT NULL,
                                  partition integer NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now())""",
    "CREATE INDEX ON plain_outbox (partition, id)",
    "CREATE ROLE app LOGIN",
    "GRANT centrifugo_publisher TO app",
    "GRANT INSERT ON business, plain_outbox TO app",
    "GRANT USAGE ON SEQUENCE business_id_seq, plain_outbox_id_seq TO app",
    "GRANT INSERT ON centrifugo_outbox TO app",
    "GRANT USAGE ON SEQUENCE centrifugo_outbox_id_seq TO app",
]

COMMAND = "jsonb_build_object('channel', 'chat:orders', 'data', jsonb_build_object('order', :n))"
SCRIPTS = {
    "plain": f"INSERT INTO plain_outbox (method, payload, partition) VALUES ('publish', {COMMAND}, 0);",
    "insert": f"INSERT INTO centrifugo_outbox (method, payload, partition) VALUES ('publish', {COMMAND}, 0);",
    "function": "SELECT centrifugo_publish('chat:orders', jsonb_build_object('order', :n));",
}

# The same three as one statement over N rows: what a call costs inside the server alone.
PER_CALL_DATA = "jsonb_build_object('order', g)"
PER_CALL = {
    "plain": "INSERT INTO plain_outbox (method, payload, partition) SELECT 'publish', "
             f"jsonb_build_object('channel', 'chat:orders', 'data', {PER_CALL_DATA}), 0 FROM generate_series(1, %s) g",
    "insert": "INSERT INTO centrifugo_outbox (method, payload, partition) SELECT 'publish', "
              f"jsonb_build_object('channel', 'chat:orders', 'data', {PER_CALL_DATA}), 0 FROM generate_series(1, %s) g",
    "function": f"SELECT count(centrifugo_publish('chat:orders', {PER_CALL_DATA})) FROM generate_series(1, %s) g",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--calls", type=int, default=50000)
    args = ap.parse_args()
    scripts_dir = tempfile.mkdtemp(prefix="centrifugo_outbox_writer_")
    os.chmod(scripts_dir, 0o755)
    for name, statement in SCRIPTS.items():
        with open(os.path.join(scripts_dir, f"{name}.sql"), "w") as f:
            f.write("\\set n random(1, 1000000)\nBEGIN;\n"
                    "INSERT INTO business (n, note) VALUES (:n, 'order placed');\n"
                    f"{statement}\nCOMMIT;\n")
        os.chmod(os.path.join(scripts_dir, f"{name}.sql"), 0o644)
    pg = PgCluster({"centrifugo.api_url": "http://127.0.0.1:9/api", "centrifugo.api_key": "k",
                    "centrifugo.retry_backoff_max": 60000}, name="writer").init()
    tps, per_call = {}, {}
    try:
        pg.start()
        for statement in SETUP:
            pg.sql(statement)
        for round_ in range(args.rounds):
            for user in ("postgres", "app"):
                for name in SCRIPTS:
                    pg.sql("TRUNCATE business, plain_outbox, centrifugo_outbox")
                    pg.sql("CHECKPOINT")
                    out = subprocess.run(
                        ["runuser", "-u", "postgres", "--", os.path.join(PG_BIN, "pgbench"), "-n", "-h", "127.0.0.1",
                         "-p", str(pg.port), "-U", user, "-c", str(args.clients), "-j", str(min(args.clients, 2)),
                         "-T", str(args.seconds), "-f", os.path.join(scripts_dir, f"{name}.sql"), "postgres"],
                        capture_output=True, text=True, cwd="/tmp", check=True)
                    value = float(re.search(r"tps = ([0-9.]+)", out.stdout).group(1))
                    tps.setdefault((user, name), []).append(value)
                    print(f"round {round_ + 1} {user:8} {name:8} {value:9.0f} TPS", flush=True)
        for round_ in range(args.rounds):
            for user in ("postgres", "app"):
                for name, statement in PER_CALL.items():
                    pg.sql("TRUNCATE business, plain_outbox, centrifugo_outbox")
                    with pg.connect(user=user) as conn:
                        started = time.perf_counter()
                        conn.execute(statement % args.calls)
                        micros = (time.perf_counter() - started) / args.calls * 1e6
                    per_call.setdefault((user, name), []).append(micros)
                    print(f"round {round_ + 1} {user:8} {name:8} {micros:6.2f} µs per row", flush=True)
    finally:
        pg.destroy()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Writer cost (bench/writer.py)",
        "",
        f"Measured {now} on the 2-core development machine with `python3 bench/writer.py --rounds {args.rounds} "
        f"--seconds {args.seconds} --clients {args.clients}`: pgbench, {args.clients} clients, a transaction "
        "that inserts a business row and one command; workers idle. Median TPS over the rounds "
        "(min–max in brackets), and the median over the rounds of each round's ratio to the plain "
        "table (min–max in brackets).",
        "",
        "| caller | plain table | INSERT into centrifugo_outbox | centrifugo_publish() |",
        "|---|---|---|---|",
    ]
    for user, label in (("postgres", "superuser"), ("app", "application role (centrifugo_publisher)")):
        cells = []
        for name in SCRIPTS:
            values = tps[(user, name)]
            median = statistics.median(values)
            # Paired: each round's ratio to the plain run just before it, so the machine's
            # slower and faster phases (which move every script's TPS) cancel out.
            ratios = [v / p for v, p in zip(values, tps[(user, "plain")])]
            ratio = "" if name == "plain" else (
                f", {statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})")
            cells.append(f"{median:.0f} ({min(values):.0f}–{max(values):.0f}){ratio}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"One call inside the server (`--calls {args.calls}` rows in one statement): microseconds per row, "
        "median of the rounds (min–max in brackets).",
        "",
        "| caller | plain table | INSERT into centrifugo_outbox | centrifugo_publish() |",
        "|---|---|---|---|",
    ]
    for user, label in (("postgres", "superuser"), ("app", "application role (centrifugo_publisher)")):
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})"
                 for v in (per_call[(user, name)] for name in PER_CALL)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "writer-report.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
