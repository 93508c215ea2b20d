"""Every exit status `ximd` returns, named once (sysexits.h names where one fits).

The numbers are an interface: systemd's unit stops restarting on 78
(RestartPreventExitStatus=78), scripts branch on 69 ("try again later"), and
`ximd status` answers 3 like `systemctl status` of an inactive unit. A command
returns one of these names, never a bare number.

This module imports nothing from ximd, so any module (ximd.config, the bottom
of the agent, included) may use it.
"""

from __future__ import annotations

EX_OK = 0
# The command ran and the answer is no: the router refused the enrollment, or
# `ximd doctor` found a check that failed. Not a sysexits.h code: it is the
# general "failed" every shell script tests for.
EX_REFUSED = 1
EX_NOT_RUNNING = 3            # `ximd status`: no daemon answers, as `systemctl status` of an inactive unit
EX_UNAVAILABLE = 69           # the router cannot be reached now; nothing changed, try again later
EX_SOFTWARE = 70              # ximd could not go on (a failed re-exec): systemd restarts it
EX_CANTCREAT = 73             # a file ximd must write (the identity) could not be written
# A command run by a user who may not read the configuration (0640 root:xerotier):
# it needs root or the xerotier group. Not 78: the file is fine, the caller is not
# allowed, and a script can tell the two apart (sysexits' EX_NOPERM).
EX_NOPERM = 77
EX_CONFIG = 78                # invalid configuration: restarting cannot fix it
EX_INTERRUPTED = 130          # Ctrl-C: 128 + SIGINT, what a shell reports for it
# Standard output's reader went away (`ximd … | head`): nothing more is said, and the
# status is what a shell reports for coreutils killed by SIGPIPE (128 + 13), so that
# `set -o pipefail` scripts see `ximd … | head` exactly as they see `seq … | head`.
EX_PIPE = 141
