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

With --profile SECONDS, the `insert` and `function` scripts also run once each as the superuser
under `perf record -a --call-graph dwarf` (needs `perf`, Debian's linux-perf), and the report
gives the CPU each costs per transaction in PostgreSQL's backends, split by the frames that
differ: parse, analysis, planning, execution, the function call and the INSERT it runs.

Usage: python3 bench/writer.py [--rounds 3] [--seconds 15] [--clients 4] [--calls 50000]
                               [--profile SECONDS]
Writes bench/writer-report.md (and prints it). Not part of CI."""

import argparse
import collections
import datetime
import os
import re
import shutil
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

# Frames whose inclusive CPU the profile reports, in the order shown: (label, frame).
PROFILE_FRAMES = [
    ("PostgreSQL processes, whole transaction", None),
    ("parse (raw parser)", "pg_parse_query"),
    ("parse analysis", "parse_analyze_fixedparams"),
    ("- of which function lookup", "ParseFuncOrColumn"),
    ("planning", "pg_plan_queries"),
    ("- of which defaults added", "expand_function_arguments"),
    ("execution (PortalRun)", "PortalRun"),
    ("- the function call", "fmgr_security_definer"),
    ("- - the INSERT it runs (SPI)", "SPI_execute_plan"),
    ("commit", "CommitTransactionCommand"),
    ("default arguments read (stringToNode)", "stringToNode"),
]
FRAME = re.compile(r"\s*[0-9a-f]+ (.*?)(\+0x[0-9a-f]+)? \(")


def profile(pg, run_pgbench, name, seconds, workdir):
    """CPU microseconds per transaction in the backends, inclusive, for PROFILE_FRAMES."""
    data = os.path.join(workdir, f"{name}.perf")
    recorder = subprocess.Popen(["perf", "record", "-a", "-F", "1999", "--call-graph", "dwarf", "-o", data],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tps = run_pgbench("postgres", name, seconds)
    finally:
        recorder.send_signal(2)
        recorder.wait()
    period_us = 1e6 / 1999
    transactions = tps * seconds
    counts, stack, comm = collections.Counter(), [], None
    script = subprocess.Popen(["perf", "script", "-i", data, "-F", "comm,ip,sym,symoff,dso"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in script.stdout:
        if not line.strip():
            if comm == "postgres":
                counts[None] += 1
                for frame in set(stack):
                    counts[frame] += 1
            stack, comm = [], None
        elif line[0] in "\t ":
            match = FRAME.match(line)
            if match:
                stack.append(match.group(1))
        else:
            comm = line.split()[0]
    script.wait()
    os.remove(data)
    return {frame: counts[frame] * period_us / transactions for _, frame in PROFILE_FRAMES}, tps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--calls", type=int, default=50000)
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS")
    args = ap.parse_args()
    if args.profile and not shutil.which("perf"):
        sys.exit("--profile needs perf (apt-get install linux-perf)")
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
    tps, per_call, profiles = {}, {}, {}

    def run_pgbench(user, name, seconds):
        pg.sql("TRUNCATE business, plain_outbox, centrifugo_outbox")
        pg.sql("CHECKPOINT")
        out = subprocess.run(
            ["runuser", "-u", "postgres", "--", os.path.join(PG_BIN, "pgbench"), "-n", "-h", "127.0.0.1",
             "-p", str(pg.port), "-U", user, "-c", str(args.clients), "-j", str(min(args.clients, 2)),
             "-T", str(seconds), "-f", os.path.join(scripts_dir, f"{name}.sql"), "postgres"],
            capture_output=True, text=True, cwd="/tmp", check=True)
        return float(re.search(r"tps = ([0-9.]+)", out.stdout).group(1))

    try:
        pg.start()
        for statement in SETUP:
            pg.sql(statement)
        for round_ in range(args.rounds):
            for user in ("postgres", "app"):
                for name in SCRIPTS:
                    value = run_pgbench(user, name, args.seconds)
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
        if args.profile:
            for name in ("insert", "function"):
                profiles[name] = profile(pg, run_pgbench, name, args.profile, scripts_dir)
                print(f"profiled {name}: {profiles[name][1]:.0f} TPS", flush=True)
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
    if profiles:
        lines += [
            "",
            f"Where the difference goes (`--profile {args.profile}`): each script once more as the superuser under "
            "`perf record -a --call-graph dwarf`; CPU microseconds per transaction spent in PostgreSQL's processes "
            "(frames inclusive, so nested rows are part of the row above them; the first row also holds the "
            "kernel's work for these processes, pgbench's own is not counted). In pgbench every statement runs on cold caches, between other "
            "processes, so a call costs several times what it costs in the one-statement loop above.",
            "",
            f"| frame | INSERT into centrifugo_outbox ({profiles['insert'][1]:.0f} TPS) | "
            f"centrifugo_publish() ({profiles['function'][1]:.0f} TPS) | difference |",
            "|---|---|---|---|",
        ]
        for label, frame in PROFILE_FRAMES:
            a, b = profiles["insert"][0][frame], profiles["function"][0][frame]
            lines.append(f"| {label} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    report = "\n".join(lines) + "\n"
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "writer-report.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
