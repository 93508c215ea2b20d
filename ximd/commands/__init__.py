"""What the `ximd` commands show: each module runs one command family and prints its result.

The domain modules (enrollment, autoconfig, doctor, config…) return values and
raise errors; only this layer (and the argparse front door, ximd.cli) writes
to standard output or standard error, and only it picks an exit status (from
ximd.exitcodes). tests/unit/test_commands_layer.py enforces the split.
"""
