"""Small helpers shared by the harness modules: free ports, waiting, paths of installed tools."""

import os
import socket
import time

CACHE = os.environ.get("CENTRIFUGO_OUTBOX_CACHE", "/var/cache/centrifugo_outbox")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls `predicate` until it returns a truthy value, which is returned; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the thing waited for may not be up yet
            last_error = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_error!r}" if last_error else ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def stop_process(proc, timeout: float):
    """SIGTERM, then SIGKILL after `timeout` seconds; None-safe."""
    import signal
    import subprocess
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_process(proc):
    if proc and proc.poll() is None:
        proc.kill()
        proc.wait()


def read_log(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
