"""What of ximd's own environment a child that may talk to the Hugging Face hub inherits.

Both the model downloader and the engine are started with an environment built
from nothing; these names are the only ones that pass through: credentials for
gated models, a mirror, proxies. One list, so that a mirror or a proxy set for
ximd reaches both children or neither.
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
