"""What OpenAI/vLLM clients and operators expect of the router's HTTP surface, over real parts.

The real router (mesh, store, HTTP app), a real CURVE link and bridge, and the stand-in
engine as its own process (tests/serving/stack.py): /v1/models with ``max_model_len``,
/v1/models/{id} through the official client, /v1/embeddings (only to nodes whose engine
embeds), /health, /version and /metrics read with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.stack import MODEL, ServingStack
from tests.support.standin_engine import StandinProcess
from xim_proto import codec
from xim_router import __version__

KEY = "sk-test-key"
STANDIN_MAX_MODEL_LEN = 2048          # what the stand-in's /v1/models reports


def started(tmp_path, *engine_flags: str):
    engine = StandinProcess(tmp_path / "engine.sock", ttft_ms=5, tokens_per_s=400, extra=engine_flags).start()
    try:
        stack = ServingStack(tmp_path, engine.socket_path, api_keys=frozenset({KEY})).start()
    except BaseException:
        engine.stop()
        raise
    return engine, stack


@pytest.fixture
def stack(tmp_path):
    engine, stack = started(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()
        engine.stop()


@pytest.fixture
def embedding_stack(tmp_path):
    engine, stack = started(tmp_path, "--embeddings")
    try:
        yield stack
    finally:
        stack.stop()
        engine.stop()


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def get(url: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def scrape(stack) -> dict[str, dict[tuple, float]]:
    """/metrics through prometheus_client's parser: {sample name: {sorted labels: value}}."""
    status, headers, body = get(stack.url + "/metrics", KEY)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


# ---------------------------------------------------------------- models


def test_model_list_carries_max_model_len(stack):
    listed = client(stack).models.list()
    assert [m.id for m in listed] == [MODEL]
    assert listed.data[0].model_extra["max_model_len"] == STANDIN_MAX_MODEL_LEN


def test_retrieve_one_model_with_the_official_client(stack):
    model = client(stack).models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "xim")
    assert model.model_extra["max_model_len"] == STANDIN_MAX_MODEL_LEN


def test_retrieve_an_unknown_model_is_openais_404(stack):
    with pytest.raises(openai.NotFoundError) as caught:
        client(stack).models.retrieve("org/no-such-model")       # an id with a slash reaches the route
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_models_need_the_api_key(stack):
    assert get(stack.url + f"/v1/models/{MODEL}")[0] == 401
    assert get(stack.url + "/metrics")[0] == 401


# ---------------------------------------------------------------- health and version


def test_health_is_200_while_a_node_serves_and_503_without_one(stack):
    status, _, body = get(stack.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    stack.call(stack.agents[0].close())
    for _ in range(100):
        status, _, body = get(stack.url + "/health")
        if status == 503:
            break
        time.sleep(0.05)
    assert status == 503 and json.loads(body)["status"] == "unavailable"
    assert get(stack.url + "/healthz")[0] == 200           # the details stay available


def test_version_names_the_protocol_revision(stack):
    status, _, body = get(stack.url + "/version")
    assert status == 200
    assert json.loads(body) == {"version": __version__, "protocol_version": codec.PROTOCOL_VERSION,
                                "protocol_revision": codec.PROTOCOL_REVISION}


# ---------------------------------------------------------------- embeddings


def test_embeddings_pass_through_when_the_engine_embeds(embedding_stack):
    c = client(embedding_stack)
    answer = c.embeddings.create(model=MODEL, input=["one text", "another text here"])
    assert [d.index for d in answer.data] == [0, 1]
    assert all(abs(sum(x * x for x in d.embedding) - 1) < 1e-6 for d in answer.data)
    assert answer.usage.prompt_tokens == 5 and answer.usage.total_tokens == 5
    # The same text, the same vector: what was computed reached the client unchanged.
    again = c.embeddings.create(model=MODEL, input="one text")
    assert again.data[0].embedding == answer.data[0].embedding
    values = scrape(embedding_stack)
    assert values["xim_router_requests_total"][(("endpoint", "embeddings"), ("status", "200"))] == 2
    (labels,) = values["xim_router_node_info"]         # the one node, which embeds
    assert dict(labels)["embeddings"] == "true"
    assert dict(labels)["worker_id"] == embedding_stack.agents[0].identity.worker_id


def test_embeddings_for_a_model_no_node_embeds_is_a_400_naming_it(stack):
    with pytest.raises(openai.BadRequestError) as caught:
        client(stack).embeddings.create(model=MODEL, input="text")
    assert caught.value.body["param"] == "model" and "offers embeddings" in caught.value.body["message"]
    # The node was never asked: its bridge refuses such an infer anyway.
    assert scrape(stack)["xim_router_request_errors_total"][(("code", "bad_request"),)] == 1


def test_streamed_embeddings_are_refused(embedding_stack):
    status, _, body = post(embedding_stack.url + "/v1/embeddings",
                           {"model": MODEL, "input": "x", "stream": True})
    assert status == 400 and "not streamed" in json.loads(body)["error"]["message"]


def post(url: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# ---------------------------------------------------------------- metrics


def test_metrics_count_requests_tokens_errors_and_show_each_nodes_load(stack):
    c = client(stack)
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=6)
    list(c.completions.create(model=MODEL, prompt="a b c", max_tokens=4, stream=True))
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=1)
    values = scrape(stack)
    requests = values["xim_router_requests_total"]
    assert requests[(("endpoint", "chat.completions"), ("status", "200"))] == 1
    assert requests[(("endpoint", "completions"), ("status", "200"))] == 1
    assert requests[(("endpoint", "completions"), ("status", "404"))] == 1
    assert values["xim_router_request_errors_total"][(("code", "model_not_found"),)] == 1
    assert values["xim_router_tokens_total"][(("kind", "completion"),)] == 10
    assert values["xim_router_tokens_total"][(("kind", "prompt"),)] > 0
    worker = (("worker_id", stack.agents[0].identity.worker_id),)
    assert values["xim_router_node_in_flight"][worker] == 0
    assert values["xim_router_node_max_concurrent"][worker] == stack.max_concurrent
    assert values["xim_router_node_load"][worker] == 0
    assert 0 <= values["xim_router_node_lease_age_seconds"][worker] < 5
    assert values["xim_router_node_model_ready"][(("model", MODEL), *worker)] == 1
    assert values["xim_router_nodes_connected"][()] == 1
    assert values["xim_router_info"][(("protocol_revision", codec.PROTOCOL_REVISION),
                                      ("version", __version__))] == 1
    assert values["xim_router_mesh_events_total"][(("event", "frame_in"),)] > 0
    assert values["process_resident_memory_bytes"][()] > 0
