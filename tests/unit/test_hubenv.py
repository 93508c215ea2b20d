"""What the model downloader inherits: the hub variables, and the unit's hf-token credential."""

from __future__ import annotations

from ximd import hubenv


def test_the_credential_becomes_hf_token_for_the_downloader(tmp_path):
    (tmp_path / "hf-token").write_text("hf_fromcredential\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "HTTPS_PROXY": "http://proxy:3128", "PATH": "/usr/bin"}
    assert hubenv.download_environment(env) == {"HTTPS_PROXY": "http://proxy:3128", "HF_TOKEN": "hf_fromcredential"}


def test_the_blank_fallback_and_an_absent_credential_mean_no_token(tmp_path):
    (tmp_path / "hf-token").write_text("\n")     # SetCredential=hf-token:\n
    assert hubenv.download_environment({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == {}
    assert hubenv.download_environment({"CREDENTIALS_DIRECTORY": str(tmp_path / "absent")}) == {}
    assert hubenv.download_environment({}) == {}


def test_a_token_in_the_environment_wins(tmp_path):
    (tmp_path / "hf-token").write_text("hf_fromcredential\n")
    for name in hubenv.TOKEN_NAMES:
        env = {"CREDENTIALS_DIRECTORY": str(tmp_path), name: "hf_fromenv"}
        assert hubenv.download_environment(env) == {name: "hf_fromenv"}
