"""The demo (README command 1): a throwaway PostgreSQL with centrifugo_outbox, a real Centrifugo
and a real WebSocket subscriber; commands published from SQL are shown arriving. Cleans up."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from harness.centrifugo import Centrifugo  # noqa: E402
from harness.pg import PgCluster  # noqa: E402
from harness.subscriber import Subscriber  # noqa: E402


def table(cursor_rows, columns):
    """Rows as psql prints them: a header of column names, a rule, aligned cells."""
    cells = [["" if v is None else str(v) for v in row] for row in cursor_rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join("    " + line for line in lines)


def query(pg, sql):
    with pg.connect() as conn:
        cur = conn.execute(sql)
        return table(cur.fetchall(), [d.name for d in cur.description])


def main():
    centrifugo = Centrifugo().start()
    pg = PgCluster({"centrifugo.api_url": centrifugo.api_url, "centrifugo.api_key": centrifugo.api_key,
                    "centrifugo.num_partitions": 2}, name="demo").init()
    sub = None
    try:
        pg.start()
        pg.sql("CREATE EXTENSION centrifugo_outbox")
        print(f"PostgreSQL 15 on port {pg.port} with centrifugo_outbox; Centrifugo on port {centrifugo.port}")
        sub = Subscriber(centrifugo, user="demo-user", channels=["chat:room1", "chat:room2"]).start()
        binary_sub = Subscriber(centrifugo, user="demo-binary", channels=["chat:files"], binary=True).start()
        print("A WebSocket subscriber is connected to chat:room1, chat:room2 (JSON) and chat:files (protobuf)")

        statements = [
            "SELECT centrifugo_publish('chat:room1', '{\"text\": \"hello from SQL\"}')",
            "SELECT centrifugo_broadcast(ARRAY['chat:room1', 'chat:room2'], '{\"text\": \"to both rooms\"}')",
            "SELECT centrifugo_publish_binary('chat:files', '\\x00010203ff'::bytea)",
            "INSERT INTO centrifugo_outbox (method, payload, partition) VALUES "
            "('publish', '{\"channel\": \"chat:room2\", \"data\": {\"text\": \"plain INSERT, as in Centrifugo docs\"}}', 1)",
        ]
        # One statement at a time, each in its own transaction: the delay printed is from the
        # moment COMMIT was sent to the moment the subscriber had the publication(s).
        expected = [("chat:room1",), ("chat:room1", "chat:room2"), ("chat:files",), ("chat:room2",)]
        with pg.connect(autocommit=False) as conn:
            for sql, channels in zip(statements, expected):
                print(f"\npsql> {sql}")
                seen = {c: len(sub.publications(c)) + len(binary_sub.publications(c)) for c in channels}
                conn.execute(sql)
                committing = time.monotonic()
                conn.commit()
                for channel in channels:
                    who = binary_sub if channel == "chat:files" else sub
                    event = who.wait_for_publications(seen[channel] + 1, channel)[-1]
                    print(f"      {channel} received {event.data!r}  "
                          f"(COMMIT → received: {(event.at - committing) * 1000:.1f} ms)")
        time.sleep(0.2)
        print("\npsql> SELECT count(*) FROM centrifugo_outbox;")
        print(query(pg, "SELECT count(*) FROM centrifugo_outbox"))
        status = ("SELECT consumer, partition, pid, state, backlog, delivered, batches, retries, dead_lettered, endpoint "
                  "FROM centrifugo_outbox_status")
        print(f"\npsql> {status};")
        print(query(pg, status))
        binary_sub.stop()
    finally:
        if sub:
            sub.stop()
        pg.destroy()
        centrifugo.stop()
    print("\nDemo finished; the cluster and Centrifugo were removed.")


if __name__ == "__main__":
    main()
