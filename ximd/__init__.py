"""ximd — the systemd-native XIM node agent."""

from xim_proto import __version__  # one distribution, one version

__all__ = ["__version__"]
