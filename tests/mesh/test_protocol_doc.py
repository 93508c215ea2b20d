"""docs/protocol.md and the codec describe the same protocol: walk the doc's tables."""

from __future__ import annotations

import re
from pathlib import Path

from xim_proto import codec, transport

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
HEADING = re.compile(r"^#### (?:record )?`(\w+)`(?: \((A|R|A or R)\))?\s*$")
ROW = re.compile(r"^\|\s*`(\w+)`\s*\|\s*([^|]+?)\s*\|\s*(yes|no)\s*\|")
SENDERS = {"A": {codec.AGENT}, "R": {codec.ROUTER}, "A or R": {codec.AGENT, codec.ROUTER}}


def documented_catalogue(text: str) -> tuple[dict, dict]:
    """{name: [(field, type, required)]} and {message: senders} from the doc's headings and tables."""
    tables: dict[str, list[tuple[str, str, bool]]] = {}
    senders: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        heading = HEADING.match(line)
        if heading:
            current = heading.group(1)
            tables[current] = []
            if heading.group(2):
                senders[current] = SENDERS[heading.group(2)]
            continue
        if line.startswith("#"):
            current = None
            continue
        row = ROW.match(line)
        if current and row:
            tables[current].append((row.group(1), row.group(2), row.group(3) == "yes"))
    return tables, senders


def documented_error_codes(text: str) -> dict[str, tuple[bool, int]]:
    section = text.split("## 6. Error codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`(\w+)`\s*\|\s*(yes|no)\s*\|\s*(\d+)\s*\|", section, re.M)
    return {code: (retry == "yes", int(status)) for code, retry, status in rows}


def limits_section(text: str) -> str:
    return text.split("### 4.6 Limits on what a frame holds", 1)[1].split("\n### ", 1)[0]


def documented_field_limits(text: str) -> dict[str, int]:
    rows = re.findall(r"^\|\s*`(\w+\.\w+)`\s*\|\s*(\d+)\s*\|", limits_section(text), re.M)
    return {name: int(limit) for name, limit in rows}


def test_every_message_and_record_matches_the_codec():
    tables, _ = documented_catalogue(DOC.read_text())
    assert tables == codec.catalogue()


def test_message_directions_match_the_codec():
    _, senders = documented_catalogue(DOC.read_text())
    assert senders == {name: set(cls.SENDERS) for name, cls in codec.MESSAGES.items()}


def test_error_code_table_matches_the_codec():
    documented = documented_error_codes(DOC.read_text())
    assert documented == {c.code: (c.retryable, c.http_status) for c in codec.ERROR_CODES.values()}


def test_documented_limits_match_the_code():
    text = DOC.read_text()
    assert f"{codec.MAX_FRAME_BYTES} bytes" in text
    assert f"# The XIM open mesh protocol, version {codec.PROTOCOL_VERSION}" in text


def test_documented_frame_limits_match_the_codec():
    text = DOC.read_text()
    assert documented_field_limits(text) == codec.field_limits()
    section = limits_section(text)
    defaults = codec.DEFAULT_LIMITS
    for row in (f"| {codec.MAX_VALUES} |", f"| {codec._MAX_ARRAY_LEN} items |",
                f"| {codec._MAX_MAP_LEN} entries |", f"| {defaults['str']} characters, unless below |",
                f"| {defaults['list']} items, unless below |", f"| {defaults['map']} entries |"):
        assert row in section, row
    assert f"| `SNDHWM` / `RCVHWM` | {transport.HIGH_WATER_MARK} messages |" in text
    assert f"{transport.PEER_QUEUE_BYTES >> 20} MiB" in text


def test_the_walker_notices_drift():
    """The checks above can fail: a changed type or a dropped row is seen."""
    text = DOC.read_text()
    drifted = text.replace("| `n` | int | yes |", "| `n` | str | yes |")
    assert documented_catalogue(drifted)[0] != codec.catalogue()
    dropped = text.replace("| `at_capacity` | yes | 429 |", "")
    assert documented_field_limits(text.replace("| `hello.hostname` | 255 |", "| `hello.hostname` | 256 |")) \
        != codec.field_limits()
    assert "at_capacity" not in documented_error_codes(dropped)


def test_group_actions_and_states_are_the_documented_ones():
    section = DOC.read_text().split("### 5.6 Groups", 1)[1].split("\n## ", 1)[0]
    record = DOC.read_text().split("#### record `GroupStatus`", 1)[1].split("\n#### ", 1)[0]
    assert all(f"`{action}`:" in section for action in codec.GROUP_ACTIONS)
    assert all(f"`{state}` (" in record for state in codec.GROUP_STATES)
