"""The live feed, metrics and the node's own start-up rules."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess


def test_events_stream_new_entries_and_metrics_count_trades(tmp_path: Path, tiny_gguf: Path):
    with NodeProcess(tmp_path / "home", tiny_gguf) as node:
        bob = node.agent("bob")
        request = urllib.request.Request(node.url + "/v1/forge/events",
                                         headers={"Authorization": f"Bearer {bob['token']}"})
        seen: list[tuple[str, dict]] = []
        ready = threading.Event()

        def listen() -> None:
            with urllib.request.urlopen(request, timeout=60) as response:
                event = None
                for raw in response:
                    line = raw.decode().strip()
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        seen.append((event, json.loads(line[6:])))
                        ready.set()
                        if sum(1 for e, _ in seen if e == "entry") >= 2:
                            return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        assert ready.wait(30)  # the hello event arrived: subscribed
        status, _, reply = node.request("POST", "/v1/chat/completions", token=bob["token"], body={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert status == 200
        listener.join(timeout=30)
        kinds = [data["entry"]["kind"] for event, data in seen if event == "entry"]
        assert seen[0][0] == "hello"
        assert kinds == ["grant", "trade"]
        assert seen[-1][1]["entry"]["seq"] == reply["x_forge"]["trade_seq"]
        status, _, metrics = node.request("GET", "/metrics")
        assert status == 200
        assert 'forge_trades_total{model="tiny-llama.gguf"} 1.0' in metrics
        observed_once = "forge_time_to_first_token_seconds_count 1.0"  # one observation
        assert observed_once in metrics
        assert f"forge_cu_earned_total {float(reply['x_forge']['cu_cost'])}" in metrics
        assert "forge_ledger_entries 2.0" in metrics


def test_non_loopback_bind_without_a_token_is_refused(tmp_path: Path, tiny_gguf: Path):
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "forge_cli", "node", "-m", str(tiny_gguf),
                           "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                          cwd=REPO, env=forge_env(home), timeout=60)
    assert done.returncode == 2
    assert "without an API token" in done.stderr and "forge wallet token" in done.stderr
    assert not (home / "api_token").exists()
    made = subprocess.run([sys.executable, "-m", "forge_cli", "wallet", "token"],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(home), timeout=60)
    assert made.returncode == 0 and made.stdout.strip() == str(home / "api_token")
    assert oct((home / "api_token").stat().st_mode & 0o777) == "0o600"


def test_safety_cli_talks_to_the_running_node(tmp_path: Path, tiny_gguf: Path):
    with NodeProcess(tmp_path / "home", tiny_gguf) as node:
        env = forge_env(node.home)

        def forge(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "forge_cli", *args], capture_output=True,
                                  text=True, cwd=REPO, env=env, timeout=60)

        killed = forge("safety", "kill", "--reason", "from the shell")
        assert killed.returncode == 0, killed.stderr
        assert "ON" in killed.stdout
        status = json.loads(forge("safety", "status", "--json").stdout)
        assert status["kill_switch"]["active"] is True
        bob = node.agent("bob")
        code, _, body = node.request("POST", "/v1/chat/completions", token=bob["token"], body={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert code == 423
        assert forge("safety", "resume").returncode == 0
        code, _, _ = node.request("POST", "/v1/chat/completions", token=bob["token"], body={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert code == 200
