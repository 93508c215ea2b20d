"""xim-router — the open router that ximd nodes join."""
