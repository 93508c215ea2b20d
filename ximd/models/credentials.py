"""The Hugging Face token: where it comes from, and that it goes nowhere else.

Order: ``model_cache.hf_token_file`` (XEROTIER_AGENT_HF_TOKEN_FILE), then the
unit's credential ``hf-token`` (``LoadCredential=hf-token:/etc/xerotier/hf-token``,
a root-only file systemd hands to the service alone; outside the unit, root
reads that file itself), then ``HF_TOKEN`` in
ximd's environment (how 0.1 took it). Read afresh for every download, so a
token file of ximd's own (model_cache.hf_token_file) is used at the next
`systemctl reload ximd`; but systemd (252 and later releases alike) hands a
service its credentials only when it starts, so a token put in
/etc/xerotier/hf-token reaches the running daemon with `systemctl restart ximd`
(cheap while a model waits: no engine runs yet). Only the
downloader's environment gets it: never argv, the engine, STATUS or a log
line (a log names the token's source, never its value).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ximd.models.choice import ModelError

log = logging.getLogger("ximd.models")

CREDENTIAL_NAME = "hf-token"
DEFAULT_TOKEN_PATH = "/etc/xerotier/hf-token"
TOKEN_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MAX_TOKEN_BYTES = 4096


@dataclass(frozen=True)
class HubToken:
    value: str = field(repr=False)
    source: str                     # what the operator may read: where it came from

    def __str__(self) -> str:
        return f"a token from {self.source}"


def _read_token_file(path: Path, source: str) -> str:
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ModelError(f"cannot read the Hugging Face token file {path} ({source}): {exc.strerror}") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise ModelError(f"the Hugging Face token file {path} is larger than a token")
    if stat.S_IMODE(st.st_mode) & 0o004:
        log.warning("the Hugging Face token file %s is readable by every user: chmod 0600 it", path)
    return raw.decode(errors="replace").strip()


def token_awaits_restart(token_file: str, environ: Mapping[str, str]) -> bool:
    """Whether a token file was put in place that this process cannot have until it restarts:
    ximd runs under the unit (a credentials directory), its ``hf-token`` credential is the blank
    fallback, and /etc/xerotier/hf-token exists now. Only its existence is looked at (it is
    root's, 0600): systemd copies it into the credential at the next start, not at a reload."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if token_file or not directory:
        return False
    try:
        blank = not (Path(directory) / CREDENTIAL_NAME).read_bytes()[:MAX_TOKEN_BYTES].strip()
    except OSError:
        blank = True
    return blank and os.path.lexists(DEFAULT_TOKEN_PATH)


def read_hf_token(token_file: str, environ: Mapping[str, str]) -> HubToken | None:
    """The token to download with, or None. Raises ModelError for a token file that is set but unreadable.

    The credential's fallback (``SetCredential=hf-token:\\n``, for when
    /etc/xerotier/hf-token does not exist) is a lone newline: no token.
    """
    if token_file:
        value = _read_token_file(Path(token_file), "model_cache.hf_token_file")
        if not value:
            raise ModelError(f"the Hugging Face token file {token_file} (model_cache.hf_token_file) is empty")
        return HubToken(value, f"model_cache.hf_token_file {token_file}")
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / CREDENTIAL_NAME).exists():
        value = _read_token_file(Path(directory) / CREDENTIAL_NAME, "systemd credential")
        if value:
            return HubToken(value, f"the systemd credential {CREDENTIAL_NAME} ({DEFAULT_TOKEN_PATH})")
    elif not directory and os.access(DEFAULT_TOKEN_PATH, os.R_OK):
        # Outside the unit (root running `ximd model pull`): the file the credential is made from.
        value = _read_token_file(Path(DEFAULT_TOKEN_PATH), DEFAULT_TOKEN_PATH)
        if value:
            return HubToken(value, DEFAULT_TOKEN_PATH)
    for name in TOKEN_ENV_NAMES:
        if environ.get(name, "").strip():
            return HubToken(environ[name].strip(), f"{name} in ximd's environment")
    return None
