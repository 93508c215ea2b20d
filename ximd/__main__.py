"""`python -m ximd`: the same CLI as /usr/bin/ximd, for a checkout or a venv without the script."""

import sys

from ximd.cli import main

sys.exit(main())
