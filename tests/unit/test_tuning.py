from pathlib import Path

from ximd import tuning


def fake_proc(tmp_path: Path, rmem: str | None, wmem: str | None) -> Path:
    core = tmp_path / "net" / "core"
    core.mkdir(parents=True)
    for name, value in (("rmem_max", rmem), ("wmem_max", wmem)):
        if value is not None:
            (core / name).write_text(value + "\n")
    return tmp_path


def test_enough(tmp_path):
    readings = tuning.check_socket_buffers(4194304, fake_proc(tmp_path, "4194304", "8388608"))
    assert all(r.ok for r in readings) and tuning.explain(readings) is None


def test_shortfall_gives_the_exact_fix(tmp_path):
    readings = tuning.check_socket_buffers(4194304, fake_proc(tmp_path, "212992", "4194304"))
    message = tuning.explain(readings)
    assert "net.core.rmem_max=212992" in message
    assert "sudo sysctl -w net.core.rmem_max=4194304" in message
    assert "wmem_max" not in message.split("Fix:")[1].split("applies")[1]
    assert tuning.SYSCTL_DROPIN in message


def test_unreadable_key_counts_as_short(tmp_path):
    readings = tuning.check_socket_buffers(4194304, fake_proc(tmp_path, None, "4194304"))
    assert "net.core.rmem_max=unreadable" in tuning.explain(readings)


def test_live_host_is_readable():
    # This host's real values: whatever they are, reading must not fail.
    assert all(r.value is not None for r in tuning.check_socket_buffers(4194304))
