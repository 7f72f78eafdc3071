"""A promoted version that comes with another tokenizer (an added special token) is served with that
tokenizer, on the real app following a registry alias (127.0.0.1): prompts are tokenized, token ids
checked and echoed with the tokenizer of the version that runs the request. A version that cannot be
loaded is a 422 to the admin's reload naming the version and the reason, and the previous version
keeps serving."""

from __future__ import annotations

import httpx
import pytest

from clusterft.registry.registry import Registry
from clusterft.serve.spec import RegistrySource, ServeSpec
from clusterft.serve.version_routes import MODEL_VERSION_HEADER
from tests.serve.conftest import ENGINE, free_port, offline_texts, running_app

pytestmark = pytest.mark.slow

NEW_TOKEN = "<|tool|>"
TEXT = f"call {NEW_TOKEN} now"


def with_added_token(model_dir):
    """`model_dir` with NEW_TOKEN added to its tokenizer and a row for it in the embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([NEW_TOKEN], special_tokens=True)
    tokenizer.save_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The registry (v1; v2 = v1's weights with NEW_TOKEN added; v3 unloadable) and the app on v1."""
    from clusterft.hf.tiny import make_tiny_model

    tmp_path = tmp_path_factory.mktemp("versions")
    v1 = make_tiny_model(tmp_path / "v1", "llama", "tiny", seed=0)
    with_added_token(make_tiny_model(tmp_path / "v2", "llama", "tiny", seed=0))
    broken = make_tiny_model(tmp_path / "v3", "llama", "tiny", seed=0)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    registry = Registry(tmp_path / "registry")
    for version in ("v1", "v2", "v3"):
        registry.register("tool", tmp_path / version, kind="full")
    registry.promote("tool", "v1")
    spec = ServeSpec(
        registry=RegistrySource(root=str(registry.root), model_name="tool", poll_interval_s=0.25),
        port=free_port(),
        engine=ENGINE,
        engine_num_cpus=0.5,
        ingress_num_cpus=0.25,
    )
    with running_app(spec) as url:
        yield url, registry, v1, tmp_path / "v2"


def test_each_version_is_served_with_its_own_tokenizer(app):
    from clusterft.hf.loading import load_tokenizer

    url, registry, v1, v2 = app
    old, new = load_tokenizer(v1), load_tokenizer(v2)
    new_id = new.convert_tokens_to_ids(NEW_TOKEN)
    old_ids, new_ids = old.encode(TEXT, add_special_tokens=False), new.encode(TEXT, add_special_tokens=False)
    assert new_id == len(old) and new_id in new_ids and len(old_ids) > len(new_ids)
    [expected_v2] = offline_texts(v2, [TEXT], 4)  # the engine tokenizes with v2's own tokenizer

    text = {"model": "tool", "prompt": TEXT, "max_tokens": 4, "temperature": 0}
    ids_echoed = {"model": "tool", "prompt": [new_id, *new_ids], "max_tokens": 1, "echo": True}
    before = httpx.post(f"{url}/v1/completions", json=text, timeout=60)
    assert before.headers[MODEL_VERSION_HEADER] == "v0001"
    assert before.json()["usage"]["prompt_tokens"] == len(old_ids)
    refused = httpx.post(f"{url}/v1/completions", json=ids_echoed, timeout=60)
    assert refused.status_code == 400 and f"[0, {new_id})" in refused.json()["error"]["message"]

    registry.promote("tool", "v2")
    reload = httpx.post(f"{url}/v1/admin/reload", timeout=120)
    assert reload.status_code == 200 and reload.json()["version"] == "v0002", reload.text
    after = httpx.post(f"{url}/v1/completions", json=text, timeout=60)
    assert after.headers[MODEL_VERSION_HEADER] == "v0002"
    assert after.json()["usage"]["prompt_tokens"] == len(new_ids)  # text in: v2's tokens
    assert after.json()["choices"][0]["text"] == expected_v2
    echoed = httpx.post(f"{url}/v1/completions", json=ids_echoed, timeout=60)
    assert echoed.status_code == 200, echoed.text  # the new id is in v2's vocab
    echo = new.decode([new_id, *new_ids])  # text out: v2's (v1 knows no id 1024)
    assert NEW_TOKEN in echo and echoed.json()["choices"][0]["text"].startswith(echo)


def test_a_version_that_cannot_be_loaded_is_a_422_naming_it_and_the_reason(app):
    url = app[0]
    serving = httpx.get(f"{url}/health").json()["version"]
    failed = httpx.post(f"{url}/v1/admin/reload", json={"version": "v3"}, timeout=120)
    assert failed.status_code == 422, failed.text
    error = failed.json()["error"]
    assert error["message"].startswith("could not load version v0003: ") and error["param"] == "version"
    assert f"still serving {serving}" in error["message"] and error["type"] == "UnprocessableEntityError"
    assert "SafetensorError" in error["message"]  # the reason: the admin may see it
    body = {"model": "tool", "prompt": TEXT, "max_tokens": 4, "temperature": 0}
    still = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert still.status_code == 200 and still.headers[MODEL_VERSION_HEADER] == serving
