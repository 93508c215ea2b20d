"""xim-router — the open router that ximd nodes join."""

from ximd import __version__  # one distribution, one version

__all__ = ["__version__"]
