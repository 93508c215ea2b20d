"""xim-router — the open router that ximd nodes join."""

from xim_proto import __version__  # one distribution, one version

__all__ = ["__version__"]
