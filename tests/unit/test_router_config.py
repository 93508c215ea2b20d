"""router.toml (xim_router.config) and what `xim-router` does with it: the file sets what
the serve flags set, a flag wins, a mistake is one line naming file, line and key and
exit 78; the credentials systemd hands over; READY/STOPPING; root's admin commands
leave the store the service's."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from xim_router import cli, config, notify


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "router.toml"
    path.write_text(text)
    return str(path)


def test_the_file_sets_the_serve_options_and_flags_win(tmp_path):
    path = write(tmp_path, 'http = "0.0.0.0:8443"\nmesh = "tcp://0.0.0.0:5555"\nlease_interval = "2s"\n'
                           'lease_timeout = 9\nadvertise = ["tcp://router.example:5555"]\n'
                           'hold_max_requests = 16\nallow_insecure_http = true\nlog_level = "debug"\n')
    args = cli.parse(["serve", "--config", path])
    assert (args.http, args.mesh, args.lease_interval, args.lease_timeout) == (
        ("0.0.0.0", 8443), "tcp://0.0.0.0:5555", 2.0, 9.0)
    assert (args.advertise, args.hold_max_requests, args.allow_insecure_http, args.log_level) == (
        ["tcp://router.example:5555"], 16, True, "debug")
    # A flag overrides its key; a list from the file is replaced, not appended to.
    args = cli.parse(["serve", "--config", path, "--lease-interval", "3s", "--advertise", "tcp://10.0.0.1:1"])
    assert (args.lease_interval, args.advertise, args.http) == (3.0, ["tcp://10.0.0.1:1"], ("0.0.0.0", 8443))


def test_without_a_file_the_defaults_stand(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    monkeypatch.delenv(config.PATH_ENV, raising=False)
    args = cli.parse(["serve"])
    assert (args.http, args.mesh, args.lease_interval) == (("127.0.0.1", 8080), "tcp://127.0.0.1:5555", 5.0)
    # Named explicitly (flag or environment), the file must exist.
    monkeypatch.setenv(config.PATH_ENV, str(tmp_path / "absent.toml"))
    with pytest.raises(config.ConfigError, match="absent.toml: no such file"):
        cli.parse(["serve"])


@pytest.mark.parametrize("text, message", [
    ('log_level = "info"\nhtp = "0.0.0.0:80"\n', r"router\.toml:2: htp: unknown key \(did you mean 'http'\?\)"),
    ('state_dir = "/tmp/x"\n', r"router\.toml:1: state_dir: unknown key"),
    ('api_key = "sk-secret"\n', r"router\.toml:1: api_key: unknown key"),
    ('lease_interval = "soon"\n', r"router\.toml:1: lease_interval: 'soon' is not a duration"),
    ('http = 8080\n', r"router\.toml:1: http: '8080' is not HOST:PORT"),
    ('allow_insecure_http = "yes"\n', r"allow_insecure_http: must be true or false"),
    ('advertise = "tcp://a:1"\n', r"advertise: must be a list"),
    ('log_level = "loud"\n', r"log_level: 'loud' is not one of debug, info, warning, error"),
    ('hold_max_requests = 0\n', r"hold_max_requests: '0' is not a whole number of at least 1"),
    ('[listen]\nhttp = "127.0.0.1:1"\n', r"listen: unknown key"),
    ('workers = 0\n', r"router\.toml:1: workers: --workers must be 1 to 64 \(or auto\), not 0"),
    ('workers = "many"\n', r"workers: 'many' is not a number of workers \(1 to 64, or auto\)"),
    ('http = [\n', r"not valid TOML"),
])
def test_mistakes_name_the_file_line_and_key(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message):
        cli.parse(["serve", "--config", write(tmp_path, text)])


def test_invalid_config_exits_78_for_serve_and_validate(tmp_path, capsys):
    path = write(tmp_path, 'lease_interval = "soon"\n')
    assert cli.main(["serve", "--config", path]) == config.EX_CONFIG
    assert cli.main(["config", "validate", path]) == config.EX_CONFIG
    err = capsys.readouterr().err
    assert err.count(f"invalid configuration: {path}:1: lease_interval") == 2
    assert cli.main(["config", "validate", write(tmp_path, 'lease_interval = "2s"\n')]) == 0
    # Contradicting timings and unusable TLS files are configuration errors too.
    assert cli.main(["serve", "--config", write(tmp_path, 'lease_interval = "9s"\nlease_timeout = "3s"\n')]) == 78
    assert cli.main(["serve", "--config", write(tmp_path, f'tls_cert = "{tmp_path}/none.pem"\n')]) == 78


def test_credentials_count_only_with_content(tmp_path):
    (tmp_path / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "tls.key").write_text("\n")            # the unit's fallback: not given
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert config.credential_path("tls.crt", env) == str(tmp_path / "tls.crt")
    assert config.credential_path("tls.key", env) is None
    assert config.credential_path("api-keys", env) is None
    assert config.credential_path("tls.crt", {}) is None


def test_tls_and_api_keys_come_from_credentials_unless_configured(tmp_path, monkeypatch):
    for name in ("tls.crt", "tls.key", "api-keys"):
        (tmp_path / name).write_text(f"{name} content\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    args = cli.with_credentials(cli.parse(["serve", "--config", write(tmp_path, "")]))
    assert (args.tls_cert, args.tls_key, args.api_key_file) == (
        str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), str(tmp_path / "api-keys"))
    args = cli.with_credentials(cli.parse(["serve", "--config", write(tmp_path, ""), "--tls-cert", "/c.pem",
                                           "--tls-key", "/k.pem", "--api-key-file", "/keys"]))
    assert (args.tls_cert, args.tls_key, args.api_key_file) == ("/c.pem", "/k.pem", "/keys")


def test_notify_sends_one_datagram_and_is_silent_without_a_manager(tmp_path):
    assert notify.send("READY=1", env={}) is False
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        assert notify.send("READY=1", "STATUS=serving", env={"NOTIFY_SOCKET": address})
        assert manager.recv(4096) == b"READY=1\nSTATUS=serving"
    assert notify.send("STOPPING=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


@pytest.fixture
def shared_tmp():
    """A directory that a dropped-to account can reach (pytest's own are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="xim-router-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="root drops to the store's owner")
def test_root_admin_commands_leave_the_store_to_its_owner(shared_tmp):
    """`xim-router join-key create` as root on the service's state directory: everything it
    creates (the database, its WAL) belongs to the directory's owner, as the service needs."""
    state = shared_tmp / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    pid = os.fork()
    if pid == 0:                      # the command drops root for good: in a child
        with open(os.devnull, "w") as sys.stdout, open(os.devnull, "w") as sys.stderr:
            os._exit(cli.main(["join-key", "create", "--state-dir", str(state), "--allow-any-model"]))
    assert os.waitpid(pid, 0)[1] == 0
    owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in state.iterdir()}
    assert "router.db" in owners
    assert set(owners.values()) == {(65534, 65534)}, owners
    # Root itself is still root here, and a root-owned state directory is left as it is.
    assert os.geteuid() == 0
    assert cli.owner_to_become([shared_tmp]) is None


def test_the_shipped_router_toml_names_only_real_keys_with_valid_examples(tmp_path):
    """etc/router.toml (/etc/xim-router/router.toml): as shipped it sets nothing, and with every
    example uncommented it is still valid, so its keys and examples cannot drift from the flags."""
    shipped = Path(__file__).resolve().parents[2] / "etc/router.toml"
    assert cli.serve_config_defaults(str(shipped)) == {}
    examples = [line[1:] for line in shipped.read_text().splitlines() if re.match(r"#[a-z_]+ = ", line)]
    assert len(examples) >= 15
    values = cli.serve_config_defaults(write(tmp_path, "\n".join(examples) + "\n"))
    assert set(values) == {line.split(" ", 1)[0] for line in examples}
