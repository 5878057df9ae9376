"""A small fault-injecting HTTP double of Centrifugo's server API, used *in addition* to the real
server for faults the real one cannot produce on demand. It either answers by itself or forwards
to a real Centrifugo, and a test-provided `script(request)` decides, per request, what happens:

    ("forward",)                      pass to the upstream Centrifugo, return its answer
    ("reply", status, body_bytes)     answer by itself
    ("fail_some", indexes, reply)     forward the batch without the commands at `indexes` and
                                      answer each of those with `reply` (a command's error)
    ("rewrite", fn)                   forward, then answer fn(upstream_reply_json) instead
    ("delay", seconds, then_action)   wait, then do then_action (past the client's timeout)
    ("hold", seconds)                 forward at once, but hold the upstream's answer back
    ("reset",)                        close the connection without answering
    ("forward_then_reset",)           pass to the upstream, then close without answering (a
                                      node that ran the batch and died before its reply)

Every request is recorded (`requests`: parsed JSON bodies) so tests can count resends, and
`max_in_flight` is the most requests it was handling at once."""

import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .common import free_port


class RecordingDouble:
    """What both doubles share: the script, every request recorded, and how many were handled
    at once. `handle(request, act)` records `request`, asks the script and runs `act(action)`."""

    def __init__(self, upstream, api_key):
        self.upstream = upstream
        self.api_key = api_key
        self.port = free_port()
        self.requests = []
        self.keep_requests = True
        self.lock = threading.Lock()
        # Requests being handled right now, and the most there ever were at once.
        self.in_flight = 0
        self.max_in_flight = 0
        self.script = lambda request: ("forward",)

    def handle(self, request, act):
        with self.lock:
            if self.keep_requests:
                self.requests.append(request)
            action = self.script(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return act(action)
        finally:
            with self.lock:
                self.in_flight -= 1

    def commands(self):
        """Every command received, in arrival order (batches flattened), as (method, payload)."""
        with self.lock:
            out = []
            for r in self.requests:
                for c in (r["body"] or {}).get("commands", []):
                    (method, payload), = c.items()
                    out.append((method, payload))
            return out


class FaultDouble(RecordingDouble):
    def __init__(self, upstream_api_url=None, api_key=None):
        super().__init__(upstream_api_url, api_key)
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                request = {"path": self.path, "body": body, "raw": raw, "key": self.headers.get("X-API-Key"), "at": time.time()}
                double.handle(request, lambda action: double._act(self, action, request))

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def api_url(self):
        return f"http://127.0.0.1:{self.port}/api"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def _forward(self, request):
        req = urllib.request.Request(self.upstream + request["path"][len("/api"):], data=request["raw"],
                                     method="POST", headers={"X-API-Key": request["key"] or "",
                                                             "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _fail_some(self, request, failed, error_reply):
        commands = request["body"]["commands"]
        kept = [c for i, c in enumerate(commands) if i not in failed]
        upstream = []
        if kept:
            status, body = self._forward(dict(request, raw=json.dumps({**request["body"], "commands": kept}).encode()))
            if status != 200:
                return status, body
            upstream = json.loads(body)["replies"]
        replies = iter(upstream)
        return 200, json.dumps({"replies": [error_reply if i in failed else next(replies)
                                            for i in range(len(commands))]}).encode()

    def _act(self, handler, action, request):
        kind = action[0]
        if kind == "delay":
            time.sleep(action[1])
            return self._act(handler, action[2], request)
        if kind == "forward_then_reset":
            self._forward(request)
            kind = "reset"
        if kind == "reset":
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            handler.connection.close()
            handler.close_connection = True
            return
        if kind == "forward":
            status, body = self._forward(request)
        elif kind == "observe":
            # Forward, then show the reply to `action[1](request, status, body)`.
            status, body = self._forward(request)
            action[1](request, status, body)
        elif kind == "hold":
            status, body = self._forward(request)
            time.sleep(action[1])
        elif kind == "rewrite":
            status, body = self._forward(request)
            body = json.dumps(action[1](json.loads(body))).encode()
        elif kind == "fail_some":
            # Centrifugo failing some commands of a batch while it runs the others: the batch goes
            # upstream without the commands at indexes action[1], which get reply action[2].
            status, body = self._fail_some(request, set(action[1]), action[2])
        elif kind == "reply":
            status, body = action[1], action[2]
        else:
            raise ValueError(action)
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except OSError:
            pass  # the client gave up (timeout): exactly the fault being tested


def ok_replies(request):
    """A successful batch reply for every command of `request` (for answering without upstream)."""
    replies = []
    for c in request["body"]["commands"]:
        (method, payload), = c.items()
        if method == "broadcast":
            replies.append({"broadcast": {"responses": [{"result": {}} for _ in payload["channels"]]}})
        else:
            replies.append({method: {}})
    return replies


class RandomCode100:
    """A script for a FaultDouble in front of the real Centrifugo: while `on`, each command of a
    batch fails with code 100 with probability `rate` (Centrifugo runs the others), as a node
    under pressure does. `key(payload)` names a command; `first_batch[key]` is every command of
    the first request that carried it, and `failed` counts the failures it answered."""

    ERROR = {"error": {"code": 100, "message": "internal server error"}}

    def __init__(self, key, rate=0.2, seed=7):
        import random
        self.key = key
        self.rate = rate
        self.random = random.Random(seed)
        self.on = True
        self.first_batch = {}
        self.failed = 0

    def __call__(self, request):
        commands = (request["body"] or {}).get("commands", [])
        keys = [self.key(next(iter(c.values()))) for c in commands]
        batch = frozenset(keys)
        for k in keys:
            self.first_batch.setdefault(k, batch)
        failing = [i for i in range(len(commands)) if self.on and self.random.random() < self.rate]
        self.failed += len(failing)
        return ("fail_some", failing, self.ERROR) if failing else ("forward",)


def reorders_outside_first_batch(received, first_batch):
    """Of one ordered lane's commands as a subscriber received them (keys that sort in the order
    they were written), the pairs (late, overtaker) where a command received later was written
    earlier and the one that overtook it was not in its first batch."""
    outside = []
    for i, overtaker in enumerate(received):
        for late in received[i + 1:]:
            if late < overtaker and overtaker not in first_batch.get(late, ()):
                outside.append((late, overtaker))
    return outside
