"""Print the shipped agent.toml: `python -m ximd.commands.configdoc > etc/agent.toml`.

ximd.configdoc renders the file from the schema; a test checks the committed
copy equals it, so this is how the copy is regenerated.
"""

from __future__ import annotations

import sys

from ximd.configdoc import render
from ximd.exitcodes import EX_OK


def main() -> int:
    print(render(), end="")
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
