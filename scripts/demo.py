"""The demo (README command 1): a throwaway PostgreSQL with centrifugo_outbox, a real Centrifugo
and a real WebSocket subscriber; commands published from SQL are shown arriving. Cleans up."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from harness.centrifugo import Centrifugo  # noqa: E402
from harness.pg import PgCluster  # noqa: E402
from harness.subscriber import Subscriber  # noqa: E402


def show(title, rows):
    print(f"\n{title}")
    for row in rows:
        print("   ", row)


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
        start = time.monotonic()
        for sql in statements:
            print(f"\npsql> {sql}")
            pg.sql(sql)
        sub.wait_for_publications(2, "chat:room1")
        sub.wait_for_publications(2, "chat:room2")
        binary_sub.wait_for_publications(1, "chat:files")
        show("The subscriber received:", [f"{e.channel}: {e.data!r}  (+{(e.at - start) * 1000:.0f} ms)"
                                          for e in sorted(sub.publications() + binary_sub.publications(), key=lambda e: e.at)])
        time.sleep(0.2)
        show("SELECT count(*) FROM centrifugo_outbox;", pg.sql("SELECT count(*) FROM centrifugo_outbox"))
        show("SELECT * FROM centrifugo_worker_status();", pg.sql("SELECT * FROM centrifugo_worker_status()"))
        binary_sub.stop()
    finally:
        if sub:
            sub.stop()
        pg.destroy()
        centrifugo.stop()
    print("\nDemo finished; the cluster and Centrifugo were removed.")


if __name__ == "__main__":
    main()
