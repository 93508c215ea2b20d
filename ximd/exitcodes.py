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
EX_CONFIG = 78                # invalid configuration: restarting cannot fix it
EX_INTERRUPTED = 130          # Ctrl-C: 128 + SIGINT, what a shell reports for it
