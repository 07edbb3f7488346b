"""Every route answers bad input with the right 4xx and a JSON error: never a 500, never text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.node_harness import NodeProcess


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    home = tmp_path_factory.mktemp("bad-input-home")
    with NodeProcess(home, tiny_gguf) as running:
        running.consumer = running.agent("dave")["token"]
        yield running


def assert_json_error(status: int, body: object, expected: int) -> None:
    assert status == expected, body
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert body["error"]["message"] and body["error"]["type"]


CHAT = "/v1/chat/completions"
GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD_BODIES = [
    (CHAT, b"{not json", 400),
    (CHAT, b"[1, 2, 3]", 400),
    (CHAT, b'"a string"', 400),
    (CHAT, json.dumps({}).encode(), 400),
    (CHAT, json.dumps({"messages": []}).encode(), 400),
    (CHAT, json.dumps({"messages": "hi"}).encode(), 400),
    (CHAT, json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "max_tokens": -1}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "max_tokens": 10**9}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "max_tokens": "ten"}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "max_tokens": True}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "temperature": 9}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "top_p": 0}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "seed": -3}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "stop": [1, 2]}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "stream": "yes"}).encode(), 400),
    (CHAT, json.dumps({**GOOD, "model": "no-such-model"}).encode(), 404),
    (CHAT, json.dumps({**GOOD, "model": 7}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": 3}).encode(), 400),
    ("/v1/completions", json.dumps({"max_tokens": 2}).encode(), 400),
    ("/v1/forge/kill", b"{oops", 403),  # a consumer may not even try
]


@pytest.mark.parametrize(("path", "raw", "expected"), BAD_BODIES,
                         ids=[f"{i}-{p.rsplit('/', 1)[-1]}" for i, (p, _, _) in enumerate(BAD_BODIES)])
def test_malformed_requests_get_a_json_4xx(node, path, raw, expected):
    status, _, body = node.request("POST", path, raw=raw, token=node.consumer)
    assert_json_error(status, body, expected)


def test_two_megabyte_body_is_413(node):
    raw = json.dumps({"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}).encode()
    status, _, body = node.request("POST", CHAT, raw=raw, token=node.consumer)
    assert_json_error(status, body, 413)


ROUTES = [("GET", "/v1/models"), ("POST", CHAT), ("POST", "/v1/completions"),
          ("GET", "/v1/forge/balance"), ("GET", "/v1/forge/pricing"), ("GET", "/v1/forge/trades"),
          ("GET", "/v1/forge/network"), ("GET", "/v1/forge/providers"), ("GET", "/v1/forge/route"),
          ("GET", "/v1/forge/safety"), ("POST", "/v1/forge/kill"), ("POST", "/v1/forge/policy"),
          ("POST", "/v1/forge/approve"),
          ("GET", "/v1/forge/ledger/entries"), ("GET", "/v1/forge/ledger/entry/0"),
          ("GET", "/v1/forge/ledger/proof/0"), ("GET", "/v1/forge/events"),
          ("GET", "/v1/forge/audits"), ("POST", "/v1/forge/audit/trade")]
# Peers read each other's checkpoints and consistency proofs (hashes only) and gossip trades
# (verified by their signatures) without tokens.
MESH_PUBLIC = [("GET", "/v1/forge/ledger/checkpoint"), ("GET", "/v1/forge/ledger/consistency"),
               ("GET", "/v1/forge/gossip/trades"), ("POST", "/v1/forge/gossip/trades"),
               ("POST", "/v1/forge/audit/dispute"), ("POST", "/ledger/witness/add-checkpoint"),
               ("GET", "/v1/forge/witness/evidence")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_missing_or_bad_token_is_401_on_every_private_route(node, method, path):
    for token in (None, "not-a-token", node.consumer + "x"):
        status, _, body = node.request(method, path, token=token, body={} if method == "POST" else None)
        # After 20 failures a minute from one address the answer becomes 429 (throttled).
        assert_json_error(status, body, 401 if status != 429 else 429)


def test_public_routes_need_no_token(node):
    for path in ("/health", "/metrics", "/openapi.json"):
        status, _, body = node.request("GET", path)
        assert status == 200, (path, body)
    status, _, spec = node.request("GET", "/openapi.json")
    described = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    for method, path in ROUTES + MESH_PUBLIC:
        template = path.replace("/0", "/{seq}") if "/ledger/entry" in path or "/ledger/proof" in path \
            else path
        assert (method, template) in described, (method, template)


def test_checkpoint_and_consistency_are_public_for_peers(node):
    status, _, body = node.request("GET", "/v1/forge/ledger/checkpoint")
    assert status == 200 and body["note"].startswith("forge.local/")
    status, _, body = node.request("GET", f"/v1/forge/ledger/consistency?old=0&new={body['size']}")
    assert status == 200 and body["proof"] == []
    # Gossip runs only in the mesh: without --mesh its routes are 404, with no token asked.
    status, _, body = node.request("POST", "/v1/forge/gossip/trades", {"trades": []})
    assert_json_error(status, body, 404)
    assert "gossip runs only on a node in the mesh" in body["error"]["message"]
    # Without the mesh a node witnesses no log: a well-formed add-checkpoint is 404.
    cp = node.request("GET", "/v1/forge/ledger/checkpoint")[2]["note"]
    status, _, body = node.request("POST", "/ledger/witness/add-checkpoint",
                                   raw=b"old 0\n\n" + cp.encode())
    assert_json_error(status, body, 404)
    assert body["error"]["code"] == "unknown_log"


def test_unknown_route_and_wrong_method_are_json(node):
    status, _, body = node.request("GET", "/v1/nope", token=node.consumer)
    assert_json_error(status, body, 404)
    status, headers, body = node.request("GET", CHAT, token=node.consumer)
    assert_json_error(status, body, 405)
    assert "POST" in headers.get("Allow", "")


@pytest.mark.parametrize("query", ["?limit=abc", "?limit=0", "?limit=100000"])
def test_bad_query_parameters_are_400(node, query):
    status, _, body = node.request("GET", "/v1/forge/trades" + query, token=node.consumer)
    assert_json_error(status, body, 400)


def test_bad_ledger_paths_are_400_or_404(node):
    for path, expected in (("/v1/forge/ledger/entry/abc", 400), ("/v1/forge/ledger/entry/99999", 404),
                           ("/v1/forge/ledger/proof/99999", 404),
                           ("/v1/forge/ledger/consistency?old=5&new=2", 400),
                           ("/v1/forge/route?mode=fastest", 400)):
        status, _, body = node.request("GET", path, token=node.consumer)
        assert_json_error(status, body, expected)
        if expected == 404:
            assert "no entry" in body["error"]["message"]


def test_another_accounts_balance_is_operator_only(node):
    status, _, body = node.request("GET", "/v1/forge/balance?account=" + "ab" * 32,
                                   token=node.consumer)
    assert_json_error(status, body, 403)
    status, _, body = node.request("GET", "/v1/forge/balance?account=" + "ab" * 32,
                                   token=node.operator_token)
    assert status == 200 and body["balance"] == 0


def test_failed_auth_is_throttled_per_client_address(node):
    for _ in range(25):
        status, _, _ = node.request("GET", "/v1/forge/balance", token="wrong")
    assert status == 429
    status, headers, body = node.request("GET", "/v1/forge/balance", token="wrong")
    assert_json_error(status, body, 429)
    assert int(headers["Retry-After"]) >= 1


# -- JSON nested too deeply: a 400 with the envelope on every JSON route, never a 500 ----------

@pytest.fixture(scope="module")
def mesh_node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    """A node in the mesh (static peers only), so the gossip routes read their bodies too."""
    home = tmp_path_factory.mktemp("deep-json-home")
    with NodeProcess(home, tiny_gguf, "--mesh", env={"FORGE_MESH_MDNS": "false"}) as running:
        running.consumer = running.agent("erin")["token"]
        yield running


DEEP = 5000
DEEP_BODIES = {
    "arrays": b"[" * DEEP + b"]" * DEEP,
    "objects": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    # Parses without recursing too far, but nests far beyond anything forge sends: refused
    # before the canonical encoder or a reply's JSON writer could recurse on it.
    "field": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "extra": '
             + b"[" * 500 + b"]" * 500 + b"}",
}
# (method, path, who): who is "consumer", "operator" or None for the peer routes.
JSON_ROUTES = [
    ("POST", CHAT, "consumer"),
    ("POST", "/v1/completions", "consumer"),
    ("POST", "/v1/forge/lend", "consumer"),
    ("POST", "/v1/forge/borrow", "consumer"),
    ("POST", "/v1/forge/agent/runs", "consumer"),
    ("POST", "/v1/forge/kill", "operator"),
    ("POST", "/v1/forge/policy", "operator"),
    ("POST", "/v1/forge/p2p/quote", None),
    ("POST", "/v1/forge/p2p/chat", None),
    ("POST", "/v1/forge/p2p/settle", None),
    ("POST", "/v1/forge/gossip/trades", None),
    ("POST", "/v1/forge/audit/dispute", None),
    ("POST", "/v1/forge/audit/trade", "operator"),
]


@pytest.mark.parametrize("shape", sorted(DEEP_BODIES))
@pytest.mark.parametrize(("method", "path", "who"), JSON_ROUTES,
                         ids=[p.removeprefix("/v1/") for _, p, _ in JSON_ROUTES])
def test_deeply_nested_json_is_a_400_envelope_on_every_json_route(mesh_node, method, path, who,
                                                                  shape):
    token = {"consumer": mesh_node.consumer, "operator": mesh_node.operator_token}.get(who)
    status, _, body = mesh_node.request(method, path, raw=DEEP_BODIES[shape], token=token)
    assert_json_error(status, body, 400)
    assert "nested more than" in body["error"]["message"], body
    status, _, _ = mesh_node.request("GET", "/health")
    assert status == 200


def test_ordinary_nesting_still_parses(mesh_node):
    """The depth limit leaves room for what forge's own requests nest (a gossip batch, a plan)."""
    status, _, body = mesh_node.request("POST", "/v1/forge/gossip/trades",
                                        {"from": "ab" * 32, "trades": []})
    assert status == 200, body
    status, _, body = mesh_node.request("POST", CHAT, {**GOOD, "metadata": [[[[[[]]]]]]},
                                        token=mesh_node.consumer)
    assert status == 200, body
