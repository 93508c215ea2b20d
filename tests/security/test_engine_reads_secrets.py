"""Finding 4: the engine (which parses untrusted prompts) cannot read the node's secrets.

A hostile "engine" runs through the real launch path of a real `ximd run`
(enrolled with a real router): ximd starts it exactly as it starts vLLM. Before
serving (it then hands over to the stand-in engine, so the node must still
serve), it tries to read every secret of the node: the identity (CURVE secret
key and token), the configuration file holding the join key, the join-key
credential, the Hugging Face token in its own environment, and ximd's
environment through /proc. It writes what it got where it may write. Every
attempt must fail, and the node must serve a request afterwards.
"""

from __future__ import annotations

import json
import stat
import textwrap
import urllib.request
from pathlib import Path

import pytest

from bench.standin_engine import write_model_dir
from tests.mesh.helpers import load_config, write_agent_config
from tests.support.daemon import Daemon
from tests.support.router import wait_for
from ximd import enrollment
from ximd.engine import sandbox

REPO = Path(__file__).resolve().parents[2]
HF_TOKEN = "hf_SECRETtokenTHEengineMUSTnotSEE"
CREDENTIAL_KEY = "xjk_" + "c" * 43

pytestmark = pytest.mark.skipif(sandbox.landlock_abi() < 1,
                                reason="the kernel has no Landlock (ximd runs the engine unconfined)")

# Runs inside the engine's process: try each secret, record what happened.
PROBE = r'''
import json, os, sys
report, targets = {}, json.loads(sys.argv[1])
ximd_pid = int(sys.argv[2])
targets["ximd environ"] = f"/proc/{ximd_pid}/environ"
for name, path in targets.items():
    try:
        with open(path, "rb") as f:
            report[name] = "READ: " + f.read(200).decode(errors="replace")
    except OSError as exc:
        report[name] = f"denied: {type(exc).__name__}: {exc.strerror}"
try:
    os.link(targets["identity"], os.path.join(os.environ["TMPDIR"], "stolen"))
    report["hard link to the identity"] = "LINKED"
except OSError as exc:
    report["hard link to the identity"] = f"denied: {exc.strerror}"
secret_names = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "XEROTIER_AGENT_JOIN_KEY", "CREDENTIALS_DIRECTORY")
report["own environment"] = sorted(n for n in secret_names if n in os.environ)
with open("/proc/self/environ", "rb") as f:
    report["own /proc environ"] = [n for n in secret_names if n.encode() in f.read()]
with open(sys.argv[3], "w") as out:
    json.dump(report, out)
'''


def hostile_engine(root: Path, targets: dict[str, str], report: Path) -> Path:
    """An engine interpreter that probes, then becomes the stand-in engine (bench/standin-python)."""
    probe = root / "probe.py"
    probe.write_text(PROBE)
    script = root / "hostile-python"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        # $PPID is ximd: setpriv and the sandbox launcher exec, they do not fork.
        {REPO / ".venv" / "bin" / "python"} {probe} '{json.dumps(targets)}' "$PPID" {report}
        exec {REPO / "bench" / "standin-python"} "$@"
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def chat(router_url: str) -> dict:
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(router_url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.load(resp)


def served_models(router_url: str) -> list[str]:
    try:
        with urllib.request.urlopen(router_url + "/v1/models", timeout=5) as resp:
            return [m["id"] for m in json.load(resp)["data"]]
    except OSError:
        return []


def test_the_engine_reads_no_secret_and_still_serves(tmp_path, router):
    node = tmp_path / "d"
    node.mkdir()
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "join-key").write_text(CREDENTIAL_KEY + "\n")
    state = node / "state"
    report = node / "cache" / "probe.json"
    targets = {
        "identity": str(state / "enrollment" / "identity.json"),
        "config with the join key": str(node / "agent.toml"),
        "join-key credential": str(credentials / "join-key"),
    }
    engine = hostile_engine(tmp_path, targets, report)
    model = write_model_dir(tmp_path / "model")
    config = (f'[router]\nurl = "{router.http_url}"\njoin_key = "{router.join_key()}"\ninsecure = true\n'
              f'[engine]\nmodel = "{model}"\nserved_model_name = "tiny"\npython = "{engine}"\n')
    daemon = Daemon(node, config=config, watchdog_usec=None, env={
        "HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": HF_TOKEN,
        "CREDENTIALS_DIRECTORY": str(credentials)})
    try:
        daemon.start()
        wait_for(lambda: "tiny" in served_models(router.http_url) or daemon.proc.poll() is not None,
                 120, "the node to serve")
        assert daemon.proc.poll() is None, daemon.log()[-4000:]

        got = json.loads(report.read_text())
        leaked = {name: outcome for name, outcome in got.items()
                  if outcome and not (isinstance(outcome, str) and outcome.startswith("denied"))}
        assert leaked == {}, f"the engine got at the node's secrets: {leaked}"

        answer = chat(router.http_url)
        assert answer["choices"][0]["message"]["content"], answer
    finally:
        daemon.stop()


def test_every_secret_of_the_node_is_on_the_hidden_list(tmp_path):
    key_file = tmp_path / "join-key.txt"
    config_path = write_agent_config(tmp_path / "agent.toml", url="https://router.example",
                                     state_dir=tmp_path / "state", join_key_file=str(key_file))
    cfg = load_config(config_path)
    hidden = enrollment.secret_paths(cfg, {"CREDENTIALS_DIRECTORY": "/run/credentials/ximd.service"})
    assert set(hidden) == {tmp_path / "state" / "enrollment", Path("/etc/xerotier"), config_path, key_file,
                           Path("/run/credentials/ximd.service")}
