"""A model directory the engine cannot load: a clear error, backoff, no busy loop (real vLLM)."""

from __future__ import annotations

import logging
import re

import pytest

from tests.engine.conftest import StateLog
from tests.support.engine import SupervisorThread, short_tempdir, tiny_launch
from ximd.engine import EngineSupervisor

pytestmark = pytest.mark.engine


def test_engine_that_cannot_load_its_model_fails_clearly_and_backs_off(engine_py, recorder):
    with short_tempdir() as root:
        model = root / "broken-model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "llama", "hidden_size": ')   # cut short
        launch, _ = tiny_launch(root, engine_py, model)
        states = StateLog()
        supervisor = EngineSupervisor(launch, on_state=states, backoff=(3.0, 60.0))
        with SupervisorThread(supervisor) as runner:
            runner.wait_for(lambda: len(states.of("backoff")) >= 2, 180, "two failed starts")
            window_s = states.of("backoff")[1][0] - states.events[0][0]
            starts = supervisor.starts
    assert starts == 2, "one start per backoff period, not a loop"
    assert re.search(r"engine exited with status 1 during start-up: OSError: .*config file at "
                     rf"'{re.escape(str(model))}/config.json' is not a valid JSON file", supervisor.last_error)
    delays = [d for _, d in states.of("backoff")]
    assert delays[0].startswith("restarting in 3 s: ") and delays[1].startswith("restarting in 6 s: ")
    # The second start came only after the first backoff had passed.
    first_backoff = states.of("backoff")[0][0]
    second_start = [t for t, s, _ in states.events if s == "starting"][1]
    assert second_start - first_backoff >= 3.0
    errors = recorder.messages("ximd.engine.supervisor", logging.ERROR)
    assert any("not a valid JSON file" in m and "Last engine output" in m for m in errors)
    assert window_s > 6  # two real starts, each importing torch and vLLM
