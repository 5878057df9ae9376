"""Benchmarks: centrifugo_outbox workers against Centrifugo's own PostgreSQL consumer, on this
machine, with the same real Centrifugo, the same outbox table shape and the same commands.

Sides: ours over HTTP (`/api/batch`), ours over gRPC (the `Batch` RPC), Centrifugo's built-in
PostgreSQL consumer, and the per-command baseline (ours with `strict_order = on`: one command per
request, what a hand-written relay does).

1. Drain throughput: N publish commands are committed to the outbox in one transaction while
   the drainer is already running (idle); we time from that COMMIT until the outbox is empty, and
   count the CPU time spent meanwhile by Centrifugo, by PostgreSQL (workers and backends) and by
   the rest of the machine. Both layouts: all processes sharing all cores, and PostgreSQL /
   Centrifugo pinned to a core each (as on separate hosts). Runs are paired (every side back to
   back, `--repeat` times) and ratios are medians of the ratios within a pair.
2. Commit → delivery latency at a steady rate (`--rate`, 1 000 commands/s by default): one
   publish per transaction, timed from COMMIT returning to a real WebSocket subscriber receiving
   it; p50/p95/p99 and every sample (for the CDF plot).
3. Kafka → Centrifugo through the bridge.

Usage: python3 bench/run.py [--rows 100000] [--repeat 3] [--partitions 1,4,8] [--limits 100,1000]
                            [--layouts shared,split] [--sides http,grpc,builtin,per_command]
                            [--rate 1000] [--seconds 10] [--skip throughput,kafka,latency]
Writes bench/results.json; bench/plot.py draws bench/*.png from it; bench/REPORT.md quotes a run."""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from harness.centrifugo import Centrifugo  # noqa: E402
from harness.common import wait_until  # noqa: E402
from harness.pg import PgCluster  # noqa: E402
from harness.subscriber import Subscriber  # noqa: E402

# The backlog is built in a staging table, then moved into the outbox by one transaction while the
# drainer is already running and idle: the clock starts when that transaction commits, so neither
# side's start-up (PostgreSQL workers, Centrifugo's process and consumer) is timed.
STAGE = ("CREATE UNLOGGED TABLE bench_stage AS "
         "SELECT g AS n, 'publish'::text AS method, jsonb_build_object('channel', 'chat:bench' || (g %% %(p)s), "
         "'data', jsonb_build_object('i', g, 'text', 'benchmark message')) AS payload, g %% %(p)s AS partition "
         "FROM generate_series(1, %(n)s) g")
RELEASE = ("WITH released AS (INSERT INTO centrifugo_outbox (method, payload, partition) "
           "SELECT method, payload, partition FROM bench_stage ORDER BY n RETURNING id, partition) "
           "SELECT max(id) FROM released GROUP BY partition")


def release_backlog(pg):
    """Commits the whole backlog in one transaction; returns the clock start (that COMMIT) and the
    last id of each partition (a partition is drained once its last id is gone)."""
    with pg.connect() as conn:
        last_ids = [row[0] for row in conn.execute(RELEASE).fetchall()]
        return time.monotonic(), last_ids


CENTRIFUGO_TABLE = """CREATE TABLE centrifugo_outbox (id BIGSERIAL PRIMARY KEY, method text NOT NULL,
    payload JSONB NOT NULL, partition INTEGER NOT NULL default 0,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL)"""


def wait_empty(pg, last_ids, timeout=600):
    """Waits until the outbox is empty, over one connection. Each partition is drained in id order,
    so it is empty once its highest id is gone: poll those ids through the primary key (a seq scan
    of the emptying table every few ms would cost more CPU than the drainer being measured), then
    confirm with one full check."""
    with pg.connect() as conn:
        deadline = time.monotonic() + timeout
        while True:
            if not conn.execute("SELECT EXISTS (SELECT FROM centrifugo_outbox WHERE id = ANY(%s))", (last_ids,)).fetchone()[0]:
                if not conn.execute("SELECT EXISTS (SELECT FROM centrifugo_outbox)").fetchone()[0]:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the outbox did not drain")
            time.sleep(0.005)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def busy_cpu_seconds():
    """CPU time spent by the whole machine so far (user + system, not idle/iowait/steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, irq, softirq = fields[0], fields[1], fields[2], fields[5], fields[6]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid):
    """user + system CPU time of a process (all its threads), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_pids(pg):
    """The postmaster and its children (workers, backends, background processes)."""
    with open(os.path.join(pg.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    pids = [postmaster]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if ppid == postmaster:
                pids.append(int(pid))
    return pids


def cpu_snapshot(pg, centrifugo_pid):
    """CPU seconds so far: the machine, Centrifugo, PostgreSQL (per pid: a process that exits
    between two snapshots takes its time with it, so the pids of the first are read again)."""
    return {"machine": busy_cpu_seconds(), "centrifugo": process_cpu_seconds(centrifugo_pid),
            "postgres": {pid: process_cpu_seconds(pid) for pid in cluster_pids(pg)}}


def cpu_split(before, after, rows):
    """CPU seconds per 100 000 commands between two snapshots, by process group."""
    postgres = sum(after["postgres"].get(pid, t) - t for pid, t in before["postgres"].items())
    postgres += sum(t for pid, t in after["postgres"].items() if pid not in before["postgres"])
    machine = after["machine"] - before["machine"]
    centrifugo = after["centrifugo"] - before["centrifugo"]
    per = 100000 / rows
    return {"machine": round(machine * per, 3), "centrifugo": round(centrifugo * per, 3),
            "postgres": round(postgres * per, 3), "rest": round(max(machine - centrifugo - postgres, 0) * per, 3)}


def pin(pid, cpus):
    """Pins every thread of a process (threads and children made later inherit it)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return  # exited meanwhile
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass


def pin_cluster(pg, cpus):
    with open(os.path.join(pg.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    pin(postmaster, cpus)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if ppid == postmaster:
                pin(int(pid), cpus)


def apply_layout(layout, pg, centrifugo):
    """shared: everything may run on every core (one small box). split: PostgreSQL (and this
    script's poller) on core 0, Centrifugo on core 1, as when they run on different hosts."""
    if layout == "split":
        pin_cluster(pg, {0})
        pin(centrifugo.proc.pid, {1})
        os.sched_setaffinity(0, {0})
    else:
        os.sched_setaffinity(0, set(range(os.cpu_count())))


def timed_drain(pg, rows, centrifugo_pid):
    start, ids = release_backlog(pg)
    before = cpu_snapshot(pg, centrifugo_pid)  # after the (CPU-heavy) release; a few ms of draining are not counted
    wait_empty(pg, ids)
    elapsed = time.monotonic() - start
    cpu = cpu_split(before, cpu_snapshot(pg, centrifugo_pid), rows)
    return {"rows": rows, "seconds": round(elapsed, 3), "per_second": round(rows / elapsed), "cpu_per_100k": cpu}


def ours_throughput(rows, partitions, limit=100, layout="shared", transport="http", strict=False):
    centrifugo = Centrifugo().start()
    pg = PgCluster({"centrifugo.api_url": centrifugo.endpoint(transport), "centrifugo.api_key": centrifugo.api_key,
                    "centrifugo.num_partitions": partitions, "centrifugo.partition_select_limit": limit,
                    "centrifugo.strict_order": "on" if strict else "off",
                    # One worker per partition, on top of PostgreSQL's own background workers.
                    "max_worker_processes": partitions + 8},
                   name="bench").init()
    try:
        pg.start()
        pg.sql("CREATE EXTENSION centrifugo_outbox")
        pg.sql("SELECT centrifugo_wait_until_running('30 seconds')")
        pg.sql(STAGE, {"p": partitions, "n": rows})
        apply_layout(layout, pg, centrifugo)
        result = timed_drain(pg, rows, centrifugo.proc.pid)
        result["batches"] = int(pg.scalar("SELECT sum(batches) FROM centrifugo_outbox_status"))
        return result
    finally:
        pg.destroy()
        centrifugo.stop()


def centrifugo_consumer_throughput(rows, partitions, limit=100, layout="shared"):
    # The same table, drained by Centrifugo's built-in consumer (the library is not preloaded here).
    # It polls every 10 ms while idle, so it notices the backlog as soon as ours is woken by the commit.
    pg = PgCluster({}, preload=False, name="benchc").init()
    pg.start()
    server = None
    try:
        pg.sql(CENTRIFUGO_TABLE + "; CREATE INDEX ON centrifugo_outbox (partition, id)")
        pg.sql(STAGE, {"p": partitions, "n": rows})
        consumer = {"name": "bench", "type": "postgresql", "enabled": True, "postgresql": {
            "dsn": f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", "outbox_table_name": "centrifugo_outbox",
            "num_partitions": partitions, "partition_select_limit": limit, "partition_poll_interval": "10ms"}}
        server = Centrifugo(extra_config={"consumers": [consumer]}).start()
        time.sleep(1)
        apply_layout(layout, pg, server)
        return timed_drain(pg, rows, server.proc.pid)
    finally:
        if server:
            server.stop()
        pg.destroy()


# The per-command baseline sends one request per command: fewer rows keep its runs short (rates
# are compared, not times).
PER_COMMAND_ROWS = 10000


def drain(side, rows, partitions, limit, layout):
    if side == "builtin":
        return centrifugo_consumer_throughput(rows, partitions, limit, layout)
    if side == "per_command":
        return ours_throughput(min(rows, PER_COMMAND_ROWS), partitions, limit, layout, "http", strict=True)
    return ours_throughput(rows, partitions, limit, layout, side)


def steady_latency(centrifugo_server, pg, rate, seconds, channel):
    """One publish per transaction at `rate` per second for `seconds`; each timed from its COMMIT
    returning to the subscriber receiving it. Returns the summary and every sample (ms)."""
    sub = Subscriber(centrifugo_server, channels=[channel]).start()
    try:
        time.sleep(0.5)
        n = int(rate * seconds)
        committed = [0.0] * n
        with pg.connect() as conn:
            conn.execute("SELECT 1")
            start = time.monotonic()
            for i in range(n):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                conn.execute("INSERT INTO centrifugo_outbox (method, payload) VALUES ('publish', %s)",
                             (json.dumps({"channel": channel, "data": {"i": i}}),))
                committed[i] = time.monotonic()
            achieved = n / (time.monotonic() - start)
        pubs = sub.wait_for_publications(n, channel, timeout=60)
        received = {p.data["i"]: p.at for p in pubs}
        lat = [(received[i] - committed[i]) * 1000 for i in range(n)]
        return {"samples": n, "rate_per_second": round(achieved), "p50_ms": round(percentile(lat, 50), 3),
                "p95_ms": round(percentile(lat, 95), 3), "p99_ms": round(percentile(lat, 99), 3),
                "mean_ms": round(statistics.mean(lat), 3), "all_ms": [round(x, 3) for x in lat]}
    finally:
        sub.stop()


def ours_latency(centrifugo, rate, seconds, transport):
    pg = PgCluster({"centrifugo.api_url": centrifugo.endpoint(transport), "centrifugo.api_key": centrifugo.api_key},
                   name="benchl").init()
    try:
        pg.start()
        pg.sql("CREATE EXTENSION centrifugo_outbox")
        pg.sql("SELECT centrifugo_wait_until_running('30 seconds')")
        return steady_latency(centrifugo, pg, rate, seconds, f"chat:latency_{transport}")
    finally:
        pg.destroy()


def centrifugo_consumer_latency(rate, seconds):
    pg = PgCluster({}, preload=False, name="benchcl").init()
    pg.start()
    server = None
    try:
        pg.sql(CENTRIFUGO_TABLE + """;
                  CREATE OR REPLACE FUNCTION centrifugo_notify_partition_change() RETURNS TRIGGER AS $$
                  BEGIN PERFORM pg_notify('centrifugo_partition_change', NEW.partition::text); RETURN NEW; END;
                  $$ LANGUAGE plpgsql;
                  CREATE TRIGGER t AFTER INSERT ON centrifugo_outbox FOR EACH ROW
                  EXECUTE FUNCTION centrifugo_notify_partition_change()""")
        consumer = {"name": "bench", "type": "postgresql", "enabled": True, "postgresql": {
            "dsn": f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", "outbox_table_name": "centrifugo_outbox",
            "num_partitions": 1, "partition_select_limit": 100, "partition_poll_interval": "300ms",
            "partition_notification_channel": "centrifugo_partition_change"}}
        server = Centrifugo(extra_config={"consumers": [consumer]}).start()
        time.sleep(1)
        return steady_latency(server, pg, rate, seconds, "chat:latency_builtin")
    finally:
        if server:
            server.stop()
        pg.destroy()


def kafka_drain(rows, partitions, start_drainer, group, max_poll_records):
    """Kafka → Centrifugo: from the first produced record to the last committed offset of `group`,
    with `start_drainer(broker, topic)` consuming the topic (returns a cleanup function)."""
    from confluent_kafka import Consumer, TopicPartition
    from harness.kafka import KafkaBroker
    broker = KafkaBroker().start()
    cleanup = None
    try:
        topic = "bench"
        broker.create_topic(topic, partitions=partitions)
        producer = broker.producer()
        # A canary per partition: the drainer has joined the group once they are committed.
        for p in range(partitions):
            producer.produce(topic, json.dumps({"method": "publish", "payload": {"channel": "chat:canary", "data": 1}}).encode(), partition=p)
        producer.flush(30)
        cleanup, centrifugo_pid = start_drainer(broker, topic)
        watcher = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "enable.auto.commit": False})
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = lambda: sum(max(tp.offset, 0) for tp in watcher.committed(tps, timeout=10))
        wait_until(lambda: committed() == partitions, 60, interval=0.2)
        records = [json.dumps({"method": "publish", "payload": {
            "channel": f"chat:kbench{i % partitions}", "data": {"i": i, "text": "benchmark message"}}}).encode()
            for i in range(rows)]
        centrifugo_cpu = process_cpu_seconds(centrifugo_pid)
        start = time.monotonic()
        for i, record in enumerate(records):
            producer.produce(topic, record, partition=i % partitions)
            if i % 10000 == 0:
                producer.poll(0)
        producer.flush(60)
        wait_until(lambda: committed() == rows + partitions, 600, interval=0.05)
        elapsed = time.monotonic() - start
        centrifugo_cpu = process_cpu_seconds(centrifugo_pid) - centrifugo_cpu
        watcher.close()
        return {"rows": rows, "kafka_partitions": partitions, "max_poll_records": max_poll_records,
                "seconds": round(elapsed, 3), "per_second": round(rows / elapsed),
                "centrifugo_cpu_per_100k": round(centrifugo_cpu * 100000 / rows, 3)}
    finally:
        if cleanup:
            cleanup()
        broker.destroy()


def kafka_throughput(rows, partitions=4, max_poll_records=100, transport="http"):
    """Through our bridge (a PostgreSQL worker) to a real Centrifugo over `transport`."""
    def start(broker, topic):
        centrifugo = Centrifugo().start()
        pg = PgCluster({"centrifugo.api_url": centrifugo.endpoint(transport), "centrifugo.api_key": centrifugo.api_key,
                        "centrifugo.kafka_brokers": broker.bootstrap, "centrifugo.kafka_topics": topic,
                        "centrifugo.kafka_consumer_group": "bench",
                        "centrifugo.kafka_max_poll_records": max_poll_records}, name="benchk").init()
        pg.start()
        pg.sql("CREATE EXTENSION centrifugo_outbox")

        def cleanup():
            pg.destroy()
            centrifugo.stop()
        return cleanup, centrifugo.proc.pid
    return kafka_drain(rows, partitions, start, "bench", max_poll_records)


def centrifugo_kafka_throughput(rows, partitions=4, max_poll_records=100):
    """Through Centrifugo's own Kafka consumer, on the same records."""
    def start(broker, topic):
        consumer = {"name": "kbench", "type": "kafka", "enabled": True, "kafka": {
            "brokers": [broker.bootstrap], "topics": [topic], "consumer_group": "cbench",
            "max_poll_records": max_poll_records}}
        centrifugo = Centrifugo(extra_config={"consumers": [consumer]}).start()
        return centrifugo.stop, centrifugo.proc.pid
    return kafka_drain(rows, partitions, start, "cbench", max_poll_records)


def summarize(runs):
    keys = runs[0]["cpu_per_100k"].keys()
    return {"runs_per_second": [r["per_second"] for r in runs],
            "median_per_second": round(statistics.median(r["per_second"] for r in runs)),
            "median_cpu_per_100k": {k: round(statistics.median(r["cpu_per_100k"][k] for r in runs), 3) for k in keys}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100000)
    parser.add_argument("--repeat", type=int, default=3, help="paired runs per setting; medians are reported")
    parser.add_argument("--partitions", default="1,4,8")
    parser.add_argument("--limits", default="100,1000", help="partition_select_limit values")
    parser.add_argument("--layouts", default="shared,split", help="shared: all cores for all; split: PostgreSQL core 0, Centrifugo core 1")
    parser.add_argument("--sides", default="http,grpc,builtin,per_command")
    parser.add_argument("--rate", type=int, default=1000, help="commands per second of the latency run")
    parser.add_argument("--seconds", type=int, default=10, help="length of each latency run")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: throughput,kafka,latency")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"))
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    sides = args.sides.split(",")
    results = {"machine": f"{os.cpu_count()} cores", "command": " ".join(["python3", "bench/run.py", *sys.argv[1:]]),
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": args.rows,
               "repeat": args.repeat, "throughput": [], "latency": {}}
    if "throughput" not in skip:
        for layout in args.layouts.split(","):
            for limit in [int(x) for x in args.limits.split(",")]:
                for p in [int(x) for x in args.partitions.split(",")]:
                    runs = {side: [] for side in sides}
                    for _ in range(args.repeat):
                        for side in sides:
                            runs[side].append(drain(side, args.rows, p, limit, layout))
                    entry = {"layout": layout, "partitions": p, "select_limit": limit}
                    for side in sides:
                        entry[side] = summarize(runs[side])
                    # Runs are paired (every side back to back): the ratio within a pair is
                    # steadier than either rate when the machine's speed drifts.
                    if "builtin" in sides:
                        entry["median_ratio_to_builtin"] = {side: round(statistics.median(
                            a["per_second"] / b["per_second"] for a, b in zip(runs[side], runs["builtin"])), 2)
                            for side in sides if side != "builtin"}
                    results["throughput"].append(entry)
                    line = " | ".join(f"{side} {entry[side]['median_per_second']}/s "
                                      f"(centrifugo {entry[side]['median_cpu_per_100k']['centrifugo']} cpu-s/100k)"
                                      for side in sides)
                    print(f"[{layout}] {p} partition(s), limit {limit}: {line} | ratios "
                          f"{entry.get('median_ratio_to_builtin')}", flush=True)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    if "latency" not in skip:
        for side in ("http", "grpc", "builtin"):
            if side not in sides:
                continue
            if side == "builtin":
                result = centrifugo_consumer_latency(args.rate, args.seconds)
            else:
                centrifugo = Centrifugo().start()
                try:
                    result = ours_latency(centrifugo, args.rate, args.seconds, side)
                finally:
                    centrifugo.stop()
            results["latency"][side] = result
            print(f"latency commit -> subscriber [{side}] at {result['rate_per_second']}/s: p50 {result['p50_ms']} ms, "
                  f"p95 {result['p95_ms']}, p99 {result['p99_ms']}", flush=True)
    if "kafka" not in skip:
        n = min(args.rows, 50000)
        runs = {"http": [], "grpc": [], "builtin": []}
        for _ in range(args.repeat):
            runs["http"].append(kafka_throughput(n, transport="http"))
            runs["grpc"].append(kafka_throughput(n, transport="grpc"))
            runs["builtin"].append(centrifugo_kafka_throughput(n))
        results["kafka"] = {side: {"runs_per_second": [r["per_second"] for r in rs],
                                   "median_per_second": round(statistics.median(r["per_second"] for r in rs)),
                                   "median_centrifugo_cpu_per_100k": statistics.median(r["centrifugo_cpu_per_100k"] for r in rs)}
                            for side, rs in runs.items()}
        results["kafka"]["records"] = n
        results["kafka"]["median_ratio_to_builtin"] = {side: round(statistics.median(
            a["per_second"] / b["per_second"] for a, b in zip(runs[side], runs["builtin"])), 2) for side in ("http", "grpc")}
        print(f"kafka -> centrifugo ({n} records, 4 Kafka partitions): " + " | ".join(
            f"{side} {results['kafka'][side]['median_per_second']}/s" for side in runs) +
            f" | ratios {results['kafka']['median_ratio_to_builtin']}", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
