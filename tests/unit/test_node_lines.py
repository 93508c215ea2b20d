"""What the node says about its link in STATUS and `ximd status`: the same text as the link's state values."""

from __future__ import annotations

import pytest

from ximd.mesh.state import LinkState
from ximd.node import link_text, serving_line


@pytest.mark.parametrize(("state", "line"), [
    (None, "serving tiny; router not connected, retrying"),
    (LinkState.CONNECTING, "serving tiny; router connecting, retrying"),
    (LinkState.CONNECTED, "serving tiny; router connected"),
    (LinkState.DISCONNECTED, "serving tiny; router disconnected, retrying"),
    (LinkState.REJECTED, "serving tiny; router rejected this node"),
])
def test_serving_line(state, line):
    assert serving_line("tiny", state) == line


def test_link_text_is_the_plain_value():
    assert [link_text(s) for s in (None, *LinkState)] == [
        "not connected", "connecting", "connected", "disconnected", "rejected"]
    assert str(LinkState.CONNECTED) == f"{LinkState.CONNECTED}" == "connected"
