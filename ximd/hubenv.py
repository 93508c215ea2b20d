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
