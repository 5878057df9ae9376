"""The packages scripts/package.sh builds (scripts/test.sh packages): the PostgreSQL 15 .deb is
installed with dpkg into Debian's PostgreSQL, a fresh cluster creates the extension and delivers a
command to the real Centrifugo, and `dpkg -r` takes every file away again; the other majors'
tarballs are unpacked into their trees (scripts/setup.sh) and checked the same way. Each .deb
holds the same files as its major's tarball.

Needs root (dpkg) and the packages: run through scripts/test.sh packages, which builds them for
15 and $MAJORS ($PACKAGE_MAJORS here) and reinstalls the source build into PostgreSQL 15 after."""

import os
import re
import subprocess
import tarfile
import uuid

import pytest

from conftest import delivery_settings, wait_for_workers
from harness.common import CACHE, wait_until
from harness.pg import PgCluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "packages")
# Set by scripts/test.sh packages. Without it this module does nothing: it replaces PostgreSQL
# 15's library (dpkg -i, then dpkg -r), which would break the other tests of a plain `pytest tests`.
MAJORS = os.environ.get("PACKAGE_MAJORS", "").split()


def _version():
    text = open(os.path.join(REPO, "Cargo.toml")).read()
    return re.search(r'\[workspace\.package\][^\[]*?\nversion = "([^"]+)"', text).group(1)


VERSION = _version()
DEBIAN_BIN = "/usr/lib/postgresql/15/bin"

pytestmark = [
    pytest.mark.skipif(not MAJORS, reason="run by scripts/test.sh packages (PACKAGE_MAJORS unset)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="installs packages with dpkg: needs root"),
]


def deb_path(major):
    return os.path.join(PACKAGES, f"postgresql-{major}-centrifugo-outbox_{VERSION}_amd64.deb")


def tarball_path(major):
    return os.path.join(PACKAGES, f"centrifugo_outbox-{VERSION}-pg{major}-linux-x86_64.tar.gz")


def deb_files(deb):
    """Regular files in the .deb, as absolute paths."""
    out = subprocess.run(["dpkg-deb", "-c", deb], check=True, capture_output=True, text=True).stdout
    return sorted(line.split(None, 5)[5].lstrip(".") for line in out.splitlines() if line.startswith("-"))


def tarball_files(tarball):
    with tarfile.open(tarball) as t:
        return sorted(m.name for m in t.getmembers() if m.isfile())


def dpkg_installed(package):
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return result.returncode == 0 and "install ok installed" in result.stdout


def dpkg_known(package):
    """Whether dpkg holds any state of `package` (installed, half-installed, unpacked, config-files)."""
    result = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout[:2] not in ("un", "pn", "")


def expected_extension_files():
    """What both package kinds hold under share/extension, besides the library."""
    upgrade = sorted(os.listdir(os.path.join(REPO, "sql", "upgrade")))
    return sorted({"centrifugo_outbox.control", f"centrifugo_outbox--{VERSION}.sql", *upgrade})


def check_extension_delivers(bin_dir, centrifugo):
    """A fresh cluster from `bin_dir`: CREATE EXTENSION at this version, the upgrade path from the
    first release is there, and a published command reaches Centrifugo."""
    pg = PgCluster(delivery_settings(centrifugo.api_url, centrifugo.api_key), bin_dir=bin_dir, name="package").init()
    try:
        pg.start()
        pg.sql("CREATE EXTENSION centrifugo_outbox")
        assert pg.scalar("SELECT extversion FROM pg_extension WHERE extname = 'centrifugo_outbox'") == VERSION
        assert pg.scalar("SELECT path FROM pg_extension_update_paths('centrifugo_outbox') "
                         "WHERE source = '0.1.0' AND target = %s", (VERSION,)) is not None
        wait_for_workers(pg)
        channel = f"chat:package{uuid.uuid4().hex[:8]}"
        pg.sql("SELECT centrifugo_publish(%s, jsonb_build_object('n', g)) FROM generate_series(1, 3) g", (channel,))
        wait_until(lambda: len(centrifugo.history(channel)) == 3, 15, what="the packaged extension's deliveries")
        assert [d["n"] for d in centrifugo.history(channel)] == [1, 2, 3]
        assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0
    finally:
        pg.destroy()


@pytest.mark.parametrize("major", MAJORS)
def test_deb_and_tarball_hold_the_same_files(major):
    deb, tarball = deb_path(major), tarball_path(major)
    assert os.path.exists(deb) and os.path.exists(tarball), "run scripts/package.sh first"
    files = deb_files(deb)
    lib = f"/usr/lib/postgresql/{major}/lib/"
    ext = f"/usr/share/postgresql/{major}/extension/"
    assert [f for f in files if f.startswith(lib)] == [lib + "centrifugo_outbox.so"]
    assert [f[len(ext):] for f in files if f.startswith(ext)] == expected_extension_files()
    assert tarball_files(tarball) == sorted(
        ["lib/centrifugo_outbox.so"] + [f"share/extension/{n}" for n in expected_extension_files()])
    fields = subprocess.run(["dpkg-deb", "-f", deb, "Package", "Version", "Architecture", "Depends"],
                            check=True, capture_output=True, text=True).stdout
    assert f"Package: postgresql-{major}-centrifugo-outbox" in fields
    assert f"Version: {VERSION}" in fields and "Architecture: amd64" in fields
    assert re.search(rf"^Depends: postgresql-{major}(,|$)", fields, re.M), fields


@pytest.fixture
def debian_package():
    """The PostgreSQL 15 .deb's name and files; removed again if a test left it installed."""
    package = "postgresql-15-centrifugo-outbox"
    # A package an operator installed on this machine is not ours to remove.
    if dpkg_known(package):
        pytest.fail(f"{package} is already known to dpkg on this machine: remove it first (dpkg --purge {package})")
    yield package, deb_files(deb_path(15))
    # Whatever state a failed test left (half-installed, unpacked), leave dpkg clean.
    if dpkg_known(package):
        subprocess.run(["dpkg", "--purge", package], check=False, capture_output=True)


@pytest.mark.skipif("15" not in MAJORS, reason="no PostgreSQL 15 package built")
def test_debian_package_installs_delivers_and_removes_cleanly(debian_package, centrifugo):
    package, files = debian_package
    # What `cargo pgrx install` (the source path) put there goes first: dpkg installs onto a clean
    # PostgreSQL, and what is there after `dpkg -r` can only be a leftover of the package.
    for f in files:
        if os.path.exists(f):
            os.unlink(f)
    installed = subprocess.run(["dpkg", "-i", deb_path(15)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    assert dpkg_installed(package)
    listed = subprocess.run(["dpkg", "-L", package], check=True, capture_output=True, text=True).stdout.split()
    for f in files:
        assert f in listed and os.path.isfile(f), f
    assert "postgresql-15" in subprocess.run(["dpkg-query", "-W", "-f=${Depends}", package],
                                             check=True, capture_output=True, text=True).stdout

    check_extension_delivers(DEBIAN_BIN, centrifugo)

    subprocess.run(["dpkg", "-r", package], check=True, capture_output=True, text=True)
    assert not dpkg_installed(package)
    assert [f for f in files if os.path.exists(f)] == []


@pytest.mark.parametrize("major", [m for m in MAJORS if m != "15"])
def test_tarball_unpacked_into_its_tree_delivers(major, centrifugo):
    tree = os.path.join(CACHE, "pg", major)
    pg_config = os.path.join(tree, "bin", "pg_config")
    pkglibdir = subprocess.run([pg_config, "--pkglibdir"], check=True, capture_output=True, text=True).stdout.strip()
    sharedir = subprocess.run([pg_config, "--sharedir"], check=True, capture_output=True, text=True).stdout.strip()
    # The tarball's layout is the tree's (lib/ and share/ under one prefix).
    assert os.path.realpath(pkglibdir) == os.path.realpath(os.path.join(tree, "lib"))
    assert os.path.realpath(sharedir) == os.path.realpath(os.path.join(tree, "share"))
    members = tarball_files(tarball_path(major))
    # Earlier installs (cargo pgrx install) go first, so that only the tarball's files are there.
    for name in members:
        path = os.path.join(tree, name)
        if os.path.exists(path):
            os.unlink(path)  # unlink, not overwrite: a running cluster may map the old library
    subprocess.run(["tar", "-xzf", tarball_path(major), "-C", os.path.realpath(tree), "--no-same-owner"], check=True)
    for name in members:
        assert os.path.isfile(os.path.join(tree, name)), name
    check_extension_delivers(os.path.join(tree, "bin"), centrifugo)
