"""Nodes for audit tests between peers: each built by build_node over its own FORGE_HOME and
served by aiohttp on 127.0.0.1 from a thread of the test process (tests/app_thread.py), so a
test can buy through a node's real buyer and read its ledger directly."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
from pathlib import Path
from typing import Any

from forge_cli.ledger import queries
from tests.app_thread import AppThread

MAX_TOKENS = 10


class InProcessNode:
    """A node built by build_node over its own FORGE_HOME, served from a thread."""

    def __init__(self, home: Path, model: Any) -> None:
        from forge_cli import config
        from forge_cli.node.app import make_app
        from forge_cli.root.build import build_node

        self.home = home
        saved = os.environ.get("FORGE_HOME")
        os.environ["FORGE_HOME"] = str(home)
        try:
            self.node = build_node(config.load(), models=[model], ledger_path=home / "ledger.db")
        finally:
            os.environ.pop("FORGE_HOME")
            if saved is not None:
                os.environ["FORGE_HOME"] = saved
        self.served = AppThread(lambda: make_app(self.node))
        self.url = self.served.url

    @property
    def id(self) -> str:
        return self.node.node_id

    def run(self, coro: Any) -> Any:
        """Run a coroutine on this node's event loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.served.loop).result(120)

    def buy(self, seller: InProcessNode, n: int, temperature: float, *,
            audit: bool = True, max_tokens: int = MAX_TOKENS, **extra: Any) -> Any:
        """A purchase through the node's buyer (audited at audit.every unless `audit` is
        off); `extra` fields join the request (response_format, seed, …)."""
        from forge_cli.mesh.buyer import Seller

        payload = {"model": "tiny", "max_tokens": max_tokens, "temperature": temperature,
                   "messages": [{"role": "user", "content": f"tell me about mats {n}"}],
                   **extra}

        async def buy() -> Any:  # the buyer's HTTP session belongs to the node's loop
            buyer = self.node.peer_buyer()
            buyer.auditor = self.node.auditor if audit else None
            try:
                return await buyer.buy(Seller(seller.id, seller.url, "tiny"), payload)
            finally:
                buyer.auditor = self.node.auditor

        return self.run(buy())

    def post(self, path: str, body: Any, token: str | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.served.port, timeout=120)
        try:
            headers = {"Content-Type": "application/json",
                       **({"Authorization": f"Bearer {token}"} if token else {})}
            conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def reputation(self, account: str) -> int:
        return self.node.reputation(account)

    def record(self, account: str) -> tuple[int, int, int]:
        return queries.audit_records(self.node.reader).get(account, (0, 0, 0))

    def close(self) -> None:
        self.served.close()
        self.node.close()
