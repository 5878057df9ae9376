"""A throwaway Redis server (Debian's redis-server) on a free port, without persistence: the
broker a Centrifugo cluster's nodes share (PUB/SUB, history, presence, idempotency cache)."""

import os
import shutil
import subprocess
import tempfile

from .common import free_port, kill_process, port_open, read_log, stop_process, wait_until

REDIS_BIN = os.environ.get("REDIS_BIN", shutil.which("redis-server") or "/usr/bin/redis-server")


class Redis:
    def __init__(self):
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="centrifugo_outbox_redis_")
        self.logfile = os.path.join(self.root, "redis.log")
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout=10):
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.root, "--logfile", self.logfile, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.proc.poll() is None and port_open(self.port), timeout,
                   what=f"redis-server on port {self.port} (log: {self.logfile})")
        return self

    def stop(self):
        stop_process(self.proc, 5)
        self.proc = None

    def kill(self):
        kill_process(self.proc)
        self.proc = None

    def log(self) -> str:
        return read_log(self.logfile)
