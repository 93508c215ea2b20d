"""The shipped /etc/xerotier/agent.toml, written from the schema.

Generating the file keeps it from drifting from the code: a test checks the
committed etc/agent.toml equals `render()`. Regenerate with
`python -m ximd.commands.configdoc > etc/agent.toml`.
"""

from __future__ import annotations

import tomli_w

from ximd.config import SCHEMA, SECTIONS, SYSTEMD_DIRECTORIES

HEADER = """\
# /etc/xerotier/agent.toml — configuration of ximd, the XIM node agent.
#
# Every key is shown commented out with its built-in default. Precedence, highest
# first: command-line flag > environment variable > agent.toml.d/*.toml (in name
# order) > this file > default. `ximd config show --origin` prints each effective
# value and where it came from; `ximd config validate` checks this file.
#
# This file may hold the join key, so it is mode 0640 root:xerotier. After editing:
#   systemctl reload ximd      (log level, join key)    or
#   systemctl restart ximd     (everything else)
#
# Secrets may instead live in root-only (0600) files that systemd hands to ximd as
# credentials: /etc/xerotier/join-key (the join key) and /etc/xerotier/hf-token (a
# Hugging Face token for gated models, seen only by the model downloader).
"""


def literal(value) -> str:
    """A setting's value as TOML, written by tomli-w.

    tomli-w has no call for a bare value, so it writes `v = <value>` and the value
    is what follows; lists are kept on one line (tomli-w breaks them over several),
    which `config show --origin` needs for its comment and this file for its `#`.
    """
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").removesuffix("\n")


def render() -> str:
    lines = [HEADER]
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for name, info in SCHEMA.items():
            if not name.startswith(section + "."):
                continue
            key = name.split(".", 1)[1]
            lines.append(f"# {info.doc}")
            sources = [f"env {info.env}"] if info.env else []
            if info.flag:
                sources.append(f"flag {info.flag}")
            if name in SYSTEMD_DIRECTORIES:
                sources.append(f"systemd ${SYSTEMD_DIRECTORIES[name]}")
            if sources:
                lines.append(f"# ({', '.join(sources)})")
            lines.append(f"#{key} = {literal(info.default)}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"

