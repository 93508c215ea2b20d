"""Run one MeshLink in its own process: `python tests/mesh/run_link.py AGENT_TOML`.

The tests kill it (SIGKILL) to see how the router's lease timing handles an
agent that vanishes without a bye. It prints each link state on stdout.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xim_proto import codec
from ximd import config as configmod
from ximd import enrollment
from ximd.mesh.link import Backoff, MeshLink
from ximd.mesh.report import HelloInfo, LeaseInfo
from ximd.mesh.state import LinkState


async def main(config_path: str) -> int:
    cfg = configmod.load(config_file=config_path, env={})
    identity = enrollment.load_identity(cfg.agent.state_dir)
    if identity is None:
        print("not enrolled", flush=True)
        return 1
    models = (codec.Model(name="tiny", state="ready"),)

    def on_state(state: LinkState, detail: str) -> None:
        print(f"{state.value}: {detail}", flush=True)

    async def on_message(msg) -> None:
        pass

    link = MeshLink(identity, hello_info=lambda: HelloInfo(models=models, max_concurrent=2),
                    lease_info=lambda: LeaseInfo(models=models, max_concurrent=2, running=1),
                    on_message=on_message, on_state=on_state, lease_interval=0.5,
                    token_refresher=enrollment.token_refresher(cfg),
                    backoff=Backoff(initial=0.1, maximum=1.0))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(link.close()))
    await link.run()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
