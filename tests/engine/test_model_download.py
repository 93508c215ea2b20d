"""A Hugging Face id that is not in the cache, with no hub to reach: a clear error.

The download runs in the real engine environment (huggingface_hub); the hub endpoint
is a closed loopback port, so nothing leaves the machine.
"""

from __future__ import annotations

import pytest

from tests.support.redis_server import free_port
from ximd.models import ModelCache, ModelChoice, ModelError, resolve

pytestmark = pytest.mark.engine


def test_uncached_model_with_no_hub_reachable_says_so(engine_py, tmp_path):
    cache = ModelCache(tmp_path / "models", 10**9)
    with pytest.raises(ModelError) as err:
        resolve(ModelChoice("org/not-cached", "router"), cache, engine_python=engine_py,
                environ={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, download_timeout_s=120)
    message = str(err.value)
    assert message.startswith(f"model org/not-cached is not in the model cache {tmp_path / 'models'}, "
                              "and downloading it from the Hugging Face hub failed: ")
    assert "internet connection" in message or "Connection" in message
    assert cache.entries() == []
