"""Fixtures for the engine tests.

The real-engine fixtures build what they need themselves (tools/setup-engine.sh,
tools/make_tiny_model.py, both cached under $XIMD_CACHE_DIR), so a plain
`pytest tests/engine` works on a fresh machine. One engine is shared by the tests
that only talk to it; tests that kill or break an engine start their own.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from tests.support.engine import SupervisorThread, engine_python, short_tempdir, tiny_launch, tiny_model
from ximd.engine import EngineReport, EngineSupervisor

ENGINE_START_TIMEOUT_S = 300   # measured 45-60 s on the 2-core CI host; shared with other work


class Recorder(logging.Handler):
    """Every record of ximd's loggers, for assertions on what the operator would read."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, logger_prefix: str = "ximd", level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.name.startswith(logger_prefix) and r.levelno >= level]


@contextmanager
def recording_logs():
    """Records ximd's logs (the engine's forwarded output included) at INFO and above."""
    handler = Recorder()
    logger = logging.getLogger("ximd")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def recorder():
    with recording_logs() as handler:
        yield handler


@dataclass
class StateLog:
    """on_state calls with the monotonic time they came at."""

    began: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    reports: list[EngineReport] = field(default_factory=list)

    def __call__(self, report: EngineReport) -> None:
        self.reports.append(report)
        self.events.append((time.monotonic() - self.began, report.state.value, report.detail))

    def of(self, state: str) -> list[tuple[float, str]]:
        return [(t, detail) for t, s, detail in self.events if s == state]


@pytest.fixture(scope="session")
def engine_py() -> str:
    return engine_python("cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(engine_py):
    return tiny_model(engine_py)


@dataclass
class RunningEngine:
    supervisor: EngineSupervisor
    runner: SupervisorThread
    states: StateLog
    recorder: Recorder
    startup_s: float

    @property
    def socket(self):
        return self.supervisor.socket_path


@pytest.fixture(scope="session")
def shared_engine(engine_py, tiny_model_dir):
    """One supervised engine on the tiny model, for tests that only talk to it."""
    with recording_logs() as handler, short_tempdir() as root:
        launch, _ = tiny_launch(root, engine_py, tiny_model_dir)
        states = StateLog()
        supervisor = EngineSupervisor(launch, on_state=states)
        with SupervisorThread(supervisor) as runner:
            runner.wait_for(lambda: supervisor.healthy, ENGINE_START_TIMEOUT_S, "healthy shared engine")
            yield RunningEngine(supervisor, runner, states, handler, time.monotonic() - states.began)
