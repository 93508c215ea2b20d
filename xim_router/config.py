"""/etc/xim-router/router.toml: `xim-router serve`'s flags, written down.

The file is flat: each key is the long name of a serve flag with '_' for '-'
(``lease_interval = "5s"`` is ``--lease-interval 5s``), and its value goes
through the flag's own parser, so the file accepts exactly what the command
line does. A flag given on the command line wins over the file. An unknown
key, a value of the wrong kind or a file that is not TOML is a `ConfigError`
naming the file, the line and the key; `xim-router` then exits 78 (EX_CONFIG)
and the unit does not restart on it.

Secrets stay out of the file: under systemd the TLS certificate and key and
the API keys are credentials (`credential_path`).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

DEFAULT_PATH = "/etc/xim-router/router.toml"
PATH_ENV = "XIM_ROUTER_CONFIG"
EX_CONFIG = 78          # sysexits: invalid configuration; the unit's RestartPreventExitStatus=

# Serve options that the file does not take: the state directory belongs to the
# unit (StateDirectory=) and to the admin commands, which never read this file;
# an API key in a config file is a secret in the wrong place (api_key_file, or
# the api-keys credential).
NOT_IN_FILE = frozenset({"help", "config", "state_dir", "api_key"})

# The credentials xim-router.service hands over ($CREDENTIALS_DIRECTORY/NAME).
TLS_CERT_CREDENTIAL = "tls.crt"
TLS_KEY_CREDENTIAL = "tls.key"
API_KEYS_CREDENTIAL = "api-keys"


class ConfigError(Exception):
    """The configuration cannot be used as written (one line for the operator)."""


def config_path(given: str | None, env: Mapping[str, str] = os.environ) -> tuple[Path, bool]:
    """(the file to read, whether it must exist): --config, then $XIM_ROUTER_CONFIG, then
    the default, which may be absent (the built-in defaults then apply)."""
    if given:
        return Path(given), True
    if env.get(PATH_ENV):
        return Path(env[PATH_ENV]), True
    return Path(DEFAULT_PATH), False


def read(path: Path, *, required: bool) -> tuple[dict, str]:
    """The file's table and text; ({}, "") for an absent optional file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file") from None
        return {}, ""
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _line(text: str, key: str) -> str:
    match = re.search(rf"^[ \t]*{re.escape(key)}[ \t]*=", text, re.MULTILINE)
    return f":{text.count(chr(10), 0, match.start()) + 1}" if match else ""


def file_values(path: Path, converters: Mapping[str, Callable[[object], object]], *,
                required: bool) -> dict[str, object]:
    """The file at ``path`` as option values: each key through its converter (the serve flag's
    own parser, given by xim_router.cli; ValueError says what the value must be)."""
    data, text = read(path, required=required)
    values: dict[str, object] = {}
    for key, value in data.items():
        where = f"{path}{_line(text, key)}: {key}"
        convert = converters.get(key)
        if convert is None:
            close = difflib.get_close_matches(key, list(converters), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key{hint}; the keys are the serve flags' names "
                              "(`xim-router serve --help`) with '_' for '-'")
        try:
            values[key] = convert(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return values


def credential_path(name: str, env: Mapping[str, str] = os.environ) -> str | None:
    """$CREDENTIALS_DIRECTORY/NAME when systemd handed it over with content; None otherwise.

    The unit's fallback for an absent file is a lone newline (systemd 252 refuses an
    empty SetCredential=), which means "not given"."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        with path.open("rb") as f:
            blank = not f.read(4096).strip()
    except OSError:
        return None
    return None if blank else str(path)
