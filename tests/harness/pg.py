"""A throwaway PostgreSQL cluster with centrifugo_outbox preloaded (or not), run as the
`postgres` user because PostgreSQL refuses to run as root. The server binaries come from
$PG_BIN (default: Debian's PostgreSQL 15; scripts/test.sh matrix points it at another major's
tree), or from `bin_dir` for one cluster."""

import os
import shutil
import subprocess
import tempfile

import psycopg

from .common import free_port, read_log, wait_until

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


def _as_postgres(*cmd, check=True, capture=True):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + list(cmd), check=check, capture_output=capture, text=True)


class PgCluster:
    """initdb + pg_ctl on a free port; `settings` become postgresql.conf lines."""

    def __init__(self, settings=None, preload=True, name="pg", bin_dir=None):
        self.bin = bin_dir or PG_BIN
        self.settings = dict(settings or {})
        self.preload = preload
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix=f"centrifugo_outbox_{name}_", dir="/var/tmp")
        self.data = os.path.join(self.root, "data")
        self.logfile = os.path.join(self.root, "postgresql.log")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")

    def init(self):
        _as_postgres(os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust",
                     "--no-sync", "-E", "UTF8", "--locale=C")
        self.write_conf()
        return self

    @classmethod
    def standby_of(cls, primary, settings=None):
        """A streaming-replication hot standby of `primary` (pg_basebackup -R), not yet started."""
        standby = cls(settings if settings is not None else primary.settings, preload=primary.preload, name="standby",
                      bin_dir=primary.bin)
        _as_postgres(os.path.join(standby.bin, "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
                     "-U", "postgres", "-D", standby.data, "-R", "-X", "stream")
        standby.write_conf()
        return standby

    def promote(self):
        _as_postgres(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-w", "promote")

    def write_conf(self):
        lines = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.root}'",
            "fsync = off",
            "log_line_prefix = '%m [%p] %b '",
        ]
        if self.preload:
            lines.append("shared_preload_libraries = 'centrifugo_outbox'")
        for key, value in self.settings.items():
            if isinstance(value, bool):
                value = "on" if value else "off"
            if isinstance(value, str):
                value = "'" + value.replace("'", "''") + "'"
            lines.append(f"{key} = {value}")
        conf = os.path.join(self.data, "conf.d.centrifugo.conf")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        main = os.path.join(self.data, "postgresql.conf")
        with open(main) as f:
            text = f.read()
        if "conf.d.centrifugo.conf" not in text:
            with open(main, "a") as f:
                f.write("\ninclude 'conf.d.centrifugo.conf'\n")
        if os.geteuid() == 0:
            shutil.chown(conf, "postgres", "postgres")

    def set(self, **settings):
        """Changes settings in the config file (call reload() or restart() after)."""
        self.settings.update(settings)
        self.write_conf()

    def start(self, check=True):
        result = _as_postgres(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", self.logfile, "-w", "-t", "60",
                              "start", check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start:\n{result.stdout}{result.stderr}\n{self.log()[-4000:]}")
        return result

    def stop(self, mode="fast"):
        _as_postgres(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart(self, mode="fast"):
        self.stop(mode)
        self.start()

    def reload(self):
        _as_postgres(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "reload")

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        return read_log(self.logfile)

    def connect(self, dbname="postgres", user="postgres", autocommit=True, **kw):
        return psycopg.connect(host="127.0.0.1", port=self.port, dbname=dbname, user=user,
                               autocommit=autocommit, **kw)

    def sql(self, query, params=None, dbname="postgres"):
        """Runs one statement in its own connection; returns all rows (or [] when none)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, query, params=None, dbname="postgres"):
        rows = self.sql(query, params, dbname)
        return rows[0][0] if rows else None

    def wait_ready(self, timeout=30):
        wait_until(lambda: self.scalar("SELECT 1") == 1, timeout, what="PostgreSQL to accept connections")
