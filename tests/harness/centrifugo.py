"""A real Centrifugo server (the pinned v6 binary built by scripts/setup.sh) on a free port,
with an API key, HS256 connection tokens, and channels clients may subscribe to."""

import base64
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from .common import CACHE, free_port, kill_process, read_log, stop_process, wait_until

CENTRIFUGO_BIN = os.environ.get("CENTRIFUGO_BIN", os.path.join(CACHE, "bin", "centrifugo"))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Centrifugo:
    def __init__(self, port=None, api_key=None, extra_config=None, hmac_secret=None, grpc_port=None):
        self.port = port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.api_key = api_key or "test-api-key-" + secrets.token_hex(8)
        self.hmac_secret = hmac_secret or secrets.token_hex(16)
        self.root = tempfile.mkdtemp(prefix="centrifugo_")
        self.config_path = os.path.join(self.root, "config.json")
        self.logfile = os.path.join(self.root, "centrifugo.log")
        self.proc = None
        channel_options = {
            "allow_subscribe_for_client": True,
            "allow_history_for_subscriber": True,
            "history_size": 10000,
            "history_ttl": "600s",
            "force_recovery": True,
        }
        self.config = {
            "http_server": {"address": "127.0.0.1", "port": self.port},
            "http_api": {"key": self.api_key},
            # The gRPC server API too, with the same key: tests run on both transports.
            "grpc_api": {"enabled": True, "address": "127.0.0.1", "port": self.grpc_port, "key": self.api_key},
            "client": {"token": {"hmac_secret_key": self.hmac_secret}, "allowed_origins": ["*"]},
            "channel": {
                "without_namespace": channel_options,
                "namespaces": [{"name": "chat", **channel_options}],
            },
            "log": {"level": "info"},
            "usage_stats": {"disabled": True},
            # /metrics counts API commands by protocol: which transport carried them.
            "prometheus": {"enabled": True},
        }
        for key, value in (extra_config or {}).items():
            self.config[key] = value

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def endpoint(self, transport: str) -> str:
        """What centrifugo.api_url is for `transport` ("http" or "grpc")."""
        return {"http": self.api_url, "grpc": self.grpc_url}[transport]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    def start(self, timeout=30):
        with open(self.config_path, "w") as f:
            json.dump(self.config, f)
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen([CENTRIFUGO_BIN, "--config", self.config_path], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        wait_until(lambda: self.proc.poll() is None and self.call("info")[0] == 200, timeout,
                   what=f"Centrifugo on port {self.port} (log: {self.logfile})")
        return self

    def stop(self):
        stop_process(self.proc, 10)
        self.proc = None

    def kill(self):
        kill_process(self.proc)
        self.proc = None

    @classmethod
    def cluster_node(cls, redis, api_key, hmac_secret, prefix):
        """One node of a cluster: nodes made with the same `redis` and `prefix` share PUB/SUB,
        history, presence and the idempotency cache, and accept each other's connection tokens."""
        return cls(api_key=api_key, hmac_secret=hmac_secret, extra_config={
            "engine": {"type": "redis", "redis": {"address": [redis.url], "prefix": prefix}},
        })

    def api_commands(self, method="publish", protocol=None) -> int:
        """Server API commands `method` this node ran (its Prometheus counter), over `protocol`
        ("http" or "grpc") or over either."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0
        for line in text.splitlines():
            if (line.startswith("centrifugo_api_command_duration_seconds_count{") and f'method="{method}"' in line
                    and (protocol is None or f'protocol="{protocol}"' in line)):
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def call(self, method, payload=None, api_key=None):
        """POSTs one server API command; returns (HTTP status, parsed body or raw text)."""
        body = json.dumps(payload or {}).encode()
        req = urllib.request.Request(f"{self.api_url}/{method}", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "X-API-Key": self.api_key if api_key is None else api_key})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                raw = resp.read().decode()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read().decode(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw

    def history(self, channel, limit=10000):
        """The channel's publications as Centrifugo stored them (data only), oldest first."""
        status, body = self.call("history", {"channel": channel, "limit": limit})
        assert status == 200 and "result" in body, body
        return [p.get("data") for p in body["result"].get("publications", [])]

    def token(self, user: str, ttl: int = 3600, **claims) -> str:
        """An HS256 connection JWT for `user`."""
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64url(json.dumps({"sub": user, "exp": int(time.time()) + ttl, **claims}).encode())
        signing_input = f"{header}.{body}".encode()
        sig = hmac.new(self.hmac_secret.encode(), signing_input, hashlib.sha256).digest()
        return f"{header}.{body}.{_b64url(sig)}"

    def log(self) -> str:
        return read_log(self.logfile)
