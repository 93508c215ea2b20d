"""The router's own package under a real systemd 252 (Debian bookworm): install xim-router
alone → READY, /healthz → root's admin commands on the service's store → TLS from
credentials → broken router.toml fails once (78) → `systemd-analyze security` below
ximd's → stop → remove → purge.

One booted guest for the module; the tests run in file order, and each one states
(and establishes where cheap) the state it starts from.
"""

from __future__ import annotations

import re
import time

import pytest
import trustme

from tests.support.nspawn import Guest, GuestError, wait_until

pytestmark = pytest.mark.system

UNIT = "xim-router.service"
CONFIG = "/etc/xim-router/router.toml"
STATE_DIR = "/var/lib/xim-router"
HTTP = "127.0.0.1:8080"

# The guest's python3 as a client: the status of one GET, an HTTPS one checked against CAFILE.
GET = r"""
import ssl, sys, urllib.request
url, cafile = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
context = ssl.create_default_context(cafile=cafile) if cafile else None
with urllib.request.urlopen(url, timeout=10, context=context) as response:
    print(response.status)
"""


def get(guest: Guest, url: str, cafile: str | None = None) -> int:
    done = guest.run(["python3", "-c", GET, url, *([cafile] if cafile else [])], check=False, timeout=30)
    if done.returncode != 0:
        raise GuestError(f"GET {url} failed:\n{done.stderr}")
    return int(done.stdout)


def installed(guest: Guest, package: str) -> bool:
    done = guest.run(["dpkg-query", "-W", "-f", "${db:Status-Status}", package], check=False)
    return done.returncode == 0 and done.stdout == "installed"


def ensure_installed(guest: Guest, packages) -> None:
    if not installed(guest, "xim-router"):
        guest.run(["apt-get", "install", "-y", "-q", *packages.router()], timeout=300)


def wait_serving(guest: Guest, url: str = f"http://{HTTP}/healthz", cafile: str | None = None) -> dict[str, str]:
    props = guest.wait_active(UNIT)

    def healthy() -> bool:
        try:
            return get(guest, url, cafile) == 200
        except GuestError:
            return False
    wait_until(healthy, 30, f"{url} to answer", interval=0.5)
    return props


def security_exposure(guest: Guest, unit: str) -> tuple[float, str]:
    out = guest.run(["systemd-analyze", "security", "--no-pager", unit], check=False).stdout
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+) (\S+)", out)
    assert match, out
    return float(match.group(1)), out


def test_router_package_installs_alone_starts_ready_and_serves(guest, packages):
    out = guest.run(["apt-get", "install", "-y", "-q", *packages.router()], timeout=300).stdout
    assert "xim-router join-key create" in out, out
    # The router's machine needs no node: neither ximd nor its account come along.
    assert not installed(guest, "xerotier-agent")
    assert not guest.exists("/usr/bin/ximd")
    for package in ("xim-router", "python3-xim-proto"):
        listing = guest.run(["dpkg", "-L", package]).stdout
        print(f"==== dpkg -L {package}\n" + "\n".join(p for p in listing.splitlines() if "__pycache__" not in p))

    # Enabled and started by the package (Debian policy); Type=notify: active = READY=1.
    assert guest.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    props = wait_serving(guest)
    assert props["SubState"] == "running" and props["NRestarts"] == "0", props
    assert props["StatusText"] == f"serving http://{HTTP}, mesh tcp://127.0.0.1:5555", props
    assert guest.show(UNIT, "Type", "NotifyAccess") == {"Type": "notify", "NotifyAccess": "main"}

    # Its own account, its private state directory, nothing else runs as it.
    assert guest.run(["getent", "passwd", "xim-router"]).stdout.split(":")[5] == STATE_DIR
    assert guest.stat(STATE_DIR) == "700 xim-router:xim-router"
    assert guest.stat(CONFIG) == "644 root:root"
    pid = props["MainPID"]
    assert guest.run(["stat", "-c", "%U:%G", f"/proc/{pid}"]).stdout.strip() == "xim-router:xim-router"
    assert guest.run(["stat", "-c", "%U %a", f"{STATE_DIR}/curve_keypair.json"]).stdout.split() == ["xim-router", "600"]


def test_root_admin_commands_keep_the_store_the_services(guest, packages):
    ensure_installed(guest, packages)
    wait_serving(guest)
    # Beside the running service, and with it stopped (root then opens the store first).
    keys = [guest.run(["xim-router", "join-key", "create", "--allow-any-model"]).stdout.strip()]
    guest.systemctl("stop", UNIT)
    keys.append(guest.run(["xim-router", "join-key", "create", "--model", "org/tiny"]).stdout.strip())
    assert all(k.startswith("xjk_") for k in keys), keys
    owners = guest.run(["stat", "-c", "%U:%G %n", *guest.run(f"ls -d {STATE_DIR}/*", check=True).stdout.split()]).stdout
    assert all(line.startswith("xim-router:xim-router ") for line in owners.splitlines()), owners
    # The service opens it again (a write transaction at start: it migrates the schema).
    guest.systemctl("start", UNIT)
    assert wait_serving(guest)["NRestarts"] == "0"
    listing = guest.run(["xim-router", "join-key", "list", "--format", "json"]).stdout
    assert listing.count('"state": "valid"') == 2, listing
    assert "no agents enrolled" in guest.run(["xim-router", "agents"]).stdout


def test_tls_files_are_credentials(guest, packages, tmp_path):
    ensure_installed(guest, packages)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    guest.write_file("/etc/xim-router/tls.crt", cert.cert_chain_pems[0].bytes().decode(), mode="0600")
    guest.write_file("/etc/xim-router/tls.key", cert.private_key_pem.bytes().decode(), mode="0600")
    guest.write_file("/root/ca.pem", ca.cert_pem.bytes().decode(), mode="0600")
    try:
        guest.systemctl("restart", UNIT)
        props = wait_serving(guest, f"https://{HTTP}/healthz", "/root/ca.pem")
        assert props["StatusText"].startswith(f"serving https://{HTTP}"), props
        # The service reads systemd's copies, never /etc/xim-router's root-only files.
        pid = props["MainPID"]
        environ = guest.run(f"tr '\\0' '\\n' </proc/{pid}/environ").stdout
        cred_dir = re.search(r"^CREDENTIALS_DIRECTORY=(.+)$", environ, re.MULTILINE).group(1)
        for name in ("tls.crt", "tls.key"):
            assert guest.run(["stat", "-c", "%U %a", f"{cred_dir}/{name}"]).stdout.split() == ["xim-router", "400"]
        assert guest.run(["runuser", "-u", "xim-router", "--", "cat", "/etc/xim-router/tls.key"],
                         check=False).returncode != 0
        # Plain HTTP is gone from that port.
        with pytest.raises(GuestError):
            get(guest, f"http://{HTTP}/healthz")
    finally:
        guest.run(["rm", "-f", "/etc/xim-router/tls.crt", "/etc/xim-router/tls.key"])
    guest.systemctl("restart", UNIT)
    wait_serving(guest)


def test_broken_config_fails_once_without_restart_loop(guest, packages):
    ensure_installed(guest, packages)
    shipped = guest.read_file(CONFIG)
    guest.write_file(CONFIG, shipped + 'lease_interval = "5s"\nhtp = "0.0.0.0:8080"\n')
    done = guest.run(["xim-router", "config", "validate"], check=False)
    assert done.returncode == 78 and f"{CONFIG}:" in done.stderr and "htp: unknown key (did you mean 'http'?)" in done.stderr
    try:
        cursor = guest.journal_cursor()
        assert guest.systemctl("restart", UNIT, check=False).returncode != 0
        assert guest.wait_state(UNIT, ["failed"]) == "failed"
        assert guest.show(UNIT, "Result", "ExecMainStatus") == {"Result": "exit-code", "ExecMainStatus": "78"}
        journal = guest.journal(UNIT, after_cursor=cursor, output="cat")
        assert re.search(rf"invalid configuration: {CONFIG}:\d+: htp: unknown key", journal), journal
        # Longer than RestartSec (5 s): RestartPreventExitStatus=78 means no second try.
        time.sleep(7)
        assert guest.show(UNIT, "NRestarts", "ActiveState") == {"NRestarts": "0", "ActiveState": "failed"}
    finally:
        guest.write_file(CONFIG, shipped)
    guest.systemctl("reset-failed", UNIT)
    guest.systemctl("start", UNIT)
    wait_serving(guest)


def test_systemd_analyze_security_exposure_is_below_ximds(guest, packages, record_property):
    ensure_installed(guest, packages)
    router, out = security_exposure(guest, UNIT)
    print(out)
    # The node's unit, for comparison, from its package on the same guest.
    guest.run(["apt-get", "install", "-y", "-q", *packages.node()], timeout=300)
    listing = guest.run(["dpkg", "-L", "xerotier-agent"]).stdout
    print("==== dpkg -L xerotier-agent\n" + "\n".join(p for p in listing.splitlines() if "__pycache__" not in p))
    node, _ = security_exposure(guest, "ximd.service")
    record_property("systemd_analyze_exposure_xim_router", router)
    record_property("systemd_analyze_exposure_ximd", node)
    print(f"systemd-analyze security: xim-router.service {router}, ximd.service {node}")
    assert router < node, out
    # Both on one machine: each keeps its own unit running.
    wait_serving(guest)


def test_stop_leaves_nothing_behind(guest, packages):
    ensure_installed(guest, packages)
    wait_serving(guest)
    guest.systemctl("stop", UNIT)
    assert guest.active_state(UNIT) == "inactive"
    assert guest.show(UNIT, "Result")["Result"] == "success"
    assert guest.processes_of("xim-router") == []
    assert "stopping" in guest.journal(UNIT, lines=20, output="cat")
    with pytest.raises(GuestError):
        get(guest, f"http://{HTTP}/healthz")
    guest.systemctl("start", UNIT)
    wait_serving(guest)


def test_remove_keeps_state_and_purge_removes_it(guest, packages):
    ensure_installed(guest, packages)
    wait_serving(guest)
    guest.run(["apt-get", "remove", "-y", "-q", "xim-router"], timeout=300)
    assert guest.processes_of("xim-router") == []
    assert guest.systemctl("cat", UNIT, check=False).returncode != 0
    assert guest.exists(f"{STATE_DIR}/router.db"), "remove must keep the router's store"
    assert guest.exists(CONFIG), "remove keeps conffiles"

    guest.write_file("/etc/xim-router/tls.key", "not a real key\n", mode="0600")
    guest.run(["apt-get", "purge", "-y", "-q", "xim-router"], timeout=300)
    for gone in (STATE_DIR, CONFIG, "/etc/xim-router"):
        assert not guest.exists(gone), f"purge left {gone}"
    assert not installed(guest, "xim-router")
