"""What of ximd's own environment the model downloader inherits.

The downloader is started with an environment built from nothing; these names
are the only ones that pass through: credentials for gated models, a mirror,
proxies. The engine inherits none of them: it runs offline (HF_HUB_OFFLINE=1)
and parses untrusted prompts, so its environment holds no secret
(ximd/engine/launch.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

HUB_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT",
                 "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
# The downloader also honours an operator's offline switch (the engine always runs offline).
DOWNLOAD_ENV_NAMES = (*HUB_ENV_NAMES, "HF_HUB_OFFLINE")


def passed_through(environ: Mapping[str, str], names: Iterable[str] = HUB_ENV_NAMES) -> dict[str, str]:
    """The variables of ``names`` that ``environ`` sets to something."""
    return {name: environ[name] for name in names if environ.get(name)}


# The unit's optional credential (LoadCredential=hf-token:/etc/xerotier/hf-token, a
# root-only file): a Hugging Face token for gated models. Only the downloader gets it;
# the engine's sandbox hides $CREDENTIALS_DIRECTORY.
HF_TOKEN_CREDENTIAL = "hf-token"
TOKEN_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def credential_token(environ: Mapping[str, str]) -> str:
    """The hf-token credential's token; "" when absent or blank (the unit's fallback,
    `SetCredential=hf-token:\\n`, is a lone newline)."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return ""
    try:
        with open(f"{directory}/{HF_TOKEN_CREDENTIAL}", encoding="utf-8") as f:
            return f.read(4096).strip()
    except OSError:
        return ""


def download_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What the model downloader inherits: the hub names ximd's environment sets, plus
    HF_TOKEN from the hf-token credential when the environment names no token."""
    inherited = passed_through(environ, DOWNLOAD_ENV_NAMES)
    if not any(name in inherited for name in TOKEN_NAMES):
        token = credential_token(environ)
        if token:
            inherited["HF_TOKEN"] = token
    return inherited
