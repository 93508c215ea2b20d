"""Root running a `ximd` command on the service account's files: xim_proto.privileges,
which xim-router's admin commands use too."""

from xim_proto.privileges import Owner, become, owner_to_become

__all__ = ["Owner", "become", "owner_to_become"]
