"""Benchmarks: centrifugo_outbox workers against Centrifugo's own PostgreSQL consumer, on this
machine, with the same real Centrifugo, the same outbox table shape and the same commands.

1. Drain throughput: N publish commands are committed to the outbox in one transaction while
   the drainer is already running (idle); we time from that COMMIT until the outbox is empty, and
   count the machine's CPU time spent meanwhile. Both layouts: all processes sharing all cores,
   and PostgreSQL / Centrifugo pinned to a core each (as on separate hosts).
2. Commit → delivery latency: one publish per transaction, timed from COMMIT returning to a real
   WebSocket subscriber receiving it (p50/p95/p99 over the samples).

Usage: python3 bench/run.py [--rows 200000] [--repeat 3] [--samples 200] [--partitions 1,4]
                            [--limits 100,1000] [--layouts shared,split] [--skip kafka,latency]
Writes bench/results.json; bench/REPORT.md quotes a run."""

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


def timed_drain(pg, rows):
    start, ids = release_backlog(pg)
    cpu0 = busy_cpu_seconds()  # after the (CPU-heavy) release; a few ms of draining are not counted
    wait_empty(pg, ids)
    elapsed = time.monotonic() - start
    cpu = busy_cpu_seconds() - cpu0
    return {"seconds": round(elapsed, 3), "per_second": round(rows / elapsed),
            "cpu_seconds_per_100k": round(cpu * 100000 / rows, 2)}


def ours_throughput(rows, partitions, limit=100, layout="shared"):
    centrifugo = Centrifugo().start()
    pg = PgCluster({"centrifugo.api_url": centrifugo.api_url, "centrifugo.api_key": centrifugo.api_key,
                    "centrifugo.num_partitions": partitions, "centrifugo.partition_select_limit": limit},
                   name="bench").init()
    try:
        pg.start()
        pg.sql("CREATE EXTENSION centrifugo_outbox")
        pg.sql("SELECT centrifugo_wait_until_running('30 seconds')")
        pg.sql(STAGE, {"p": partitions, "n": rows})
        apply_layout(layout, pg, centrifugo)
        result = timed_drain(pg, rows)
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
        return timed_drain(pg, rows)
    finally:
        if server:
            server.stop()
        pg.destroy()


def latency(centrifugo_server, pg, samples, channel):
    sub = Subscriber(centrifugo_server, channels=[channel]).start()
    try:
        time.sleep(0.5)
        lat = []
        with pg.connect() as conn:
            for i in range(samples):
                conn.execute("INSERT INTO centrifugo_outbox (method, payload) VALUES ('publish', %s)",
                             (json.dumps({"channel": channel, "data": {"i": i}}),))
                committed = time.monotonic()
                pub = sub.wait_for_publications(i + 1, channel, timeout=10)[i]
                lat.append((pub.at - committed) * 1000)
                time.sleep(0.01)
        return {"samples": samples, "p50_ms": round(percentile(lat, 50), 2), "p95_ms": round(percentile(lat, 95), 2),
                "p99_ms": round(percentile(lat, 99), 2), "mean_ms": round(statistics.mean(lat), 2)}
    finally:
        sub.stop()


def ours_latency(centrifugo, samples):
    pg = PgCluster({"centrifugo.api_url": centrifugo.api_url, "centrifugo.api_key": centrifugo.api_key},
                   name="benchl").init()
    try:
        pg.start()
        pg.sql("CREATE EXTENSION centrifugo_outbox")
        return latency(centrifugo, pg, samples, "chat:latency_ours")
    finally:
        pg.destroy()


def centrifugo_consumer_latency(samples):
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
        return latency(server, pg, samples, "chat:latency_theirs")
    finally:
        if server:
            server.stop()
        pg.destroy()


def kafka_throughput(centrifugo, rows, partitions=4, max_poll_records=100):
    """Kafka → Centrifugo through the bridge: from the first produced record to the last committed offset."""
    from confluent_kafka import Consumer, TopicPartition
    from harness.kafka import KafkaBroker
    broker = KafkaBroker().start()
    pg = None
    try:
        topic = "bench"
        broker.create_topic(topic, partitions=partitions)
        pg = PgCluster({"centrifugo.api_url": centrifugo.api_url, "centrifugo.api_key": centrifugo.api_key,
                        "centrifugo.kafka_brokers": broker.bootstrap, "centrifugo.kafka_topics": topic,
                        "centrifugo.kafka_consumer_group": "bench",
                        "centrifugo.kafka_max_poll_records": max_poll_records}, name="benchk").init()
        pg.start()
        pg.sql("CREATE EXTENSION centrifugo_outbox")
        producer = broker.producer()
        # A canary per partition: the bridge has joined the group once they are committed.
        for p in range(partitions):
            producer.produce(topic, json.dumps({"method": "publish", "payload": {"channel": "chat:canary", "data": 1}}).encode(), partition=p)
        producer.flush(30)
        watcher = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench", "enable.auto.commit": False})
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = lambda: sum(max(tp.offset, 0) for tp in watcher.committed(tps, timeout=10))
        wait_until(lambda: committed() == partitions, 60, interval=0.2)
        start = time.monotonic()
        for i in range(rows):
            producer.produce(topic, json.dumps({"method": "publish", "payload": {
                "channel": f"chat:kbench{i % partitions}", "data": {"i": i, "text": "benchmark message"}}}).encode(),
                partition=i % partitions)
            if i % 10000 == 0:
                producer.poll(0)
        producer.flush(60)
        wait_until(lambda: committed() == rows + partitions, 600, interval=0.05)
        elapsed = time.monotonic() - start
        watcher.close()
        return {"rows": rows, "kafka_partitions": partitions, "max_poll_records": max_poll_records,
                "seconds": round(elapsed, 3), "per_second": round(rows / elapsed)}
    finally:
        if pg:
            pg.destroy()
        broker.destroy()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200000)
    parser.add_argument("--repeat", type=int, default=5, help="runs per side and setting (alternating); medians are reported")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--partitions", default="1,4")
    parser.add_argument("--limits", default="100,1000", help="partition_select_limit values")
    parser.add_argument("--layouts", default="shared,split", help="shared: all cores for all; split: PostgreSQL core 0, Centrifugo core 1")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: throughput,kafka,latency")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results = {"machine": f"{os.cpu_count()} cores", "rows": args.rows, "repeat": args.repeat, "throughput": [], "latency": {}}
    if "throughput" not in skip:
        for layout in args.layouts.split(","):
            for limit in [int(x) for x in args.limits.split(",")]:
                for p in [int(x) for x in args.partitions.split(",")]:
                    ours, theirs = [], []
                    for _ in range(args.repeat):
                        ours.append(ours_throughput(args.rows, p, limit, layout))
                        theirs.append(centrifugo_consumer_throughput(args.rows, p, limit, layout))
                    entry = {"layout": layout, "partitions": p, "select_limit": limit}
                    for name, runs in (("centrifugo_outbox", ours), ("centrifugo_builtin_consumer", theirs)):
                        entry[name] = {"runs_per_second": [r["per_second"] for r in runs],
                                       "median_per_second": round(statistics.median(r["per_second"] for r in runs)),
                                       "median_cpu_seconds_per_100k": statistics.median(r["cpu_seconds_per_100k"] for r in runs)}
                    entry["centrifugo_outbox"]["batches"] = ours[-1]["batches"]
                    # Runs are paired (ours, then theirs, back to back): the ratio within a pair is
                    # steadier than either rate when the machine's speed drifts.
                    entry["median_ratio_ours_to_theirs"] = round(statistics.median(
                        a["per_second"] / b["per_second"] for a, b in zip(ours, theirs)), 2)
                    results["throughput"].append(entry)
                    o, t = entry["centrifugo_outbox"], entry["centrifugo_builtin_consumer"]
                    print(f"throughput [{layout}] {p} partition(s), select limit {limit}: ours {o['median_per_second']}/s "
                          f"{o['runs_per_second']} ({o['median_cpu_seconds_per_100k']} cpu-s/100k) | Centrifugo's consumer "
                          f"{t['median_per_second']}/s {t['runs_per_second']} ({t['median_cpu_seconds_per_100k']} cpu-s/100k)"
                          f" | ratio {entry['median_ratio_ours_to_theirs']}",
                          flush=True)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    centrifugo = Centrifugo().start()
    try:
        if "kafka" not in skip:
            results["kafka"] = kafka_throughput(centrifugo, min(args.rows, 50000))
            print(f"kafka -> centrifugo through the bridge: {results['kafka']['per_second']}/s "
                  f"({results['kafka']['rows']} records, {results['kafka']['seconds']} s, 4 Kafka partitions)", flush=True)
        if "latency" not in skip:
            results["latency"]["centrifugo_outbox"] = ours_latency(centrifugo, args.samples)
            results["latency"]["centrifugo_builtin_consumer_with_notify"] = centrifugo_consumer_latency(args.samples)
            print("latency commit -> subscriber:", json.dumps(results["latency"]), flush=True)
    finally:
        centrifugo.stop()
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
