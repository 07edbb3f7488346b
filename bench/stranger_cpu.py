#!/usr/bin/env python3
"""What a sender of over-long prompts costs a node: its CPU time during a bounded attack.

    python bench/stranger_cpu.py [--channel http|p2p|anon] [--threads 2] [--seconds 20]
                                 [--model PATH] [--json]

Starts a real `forge node` on 127.0.0.1 (the tiny test GGUF unless --model names one), then
--threads attackers send `{"max_tokens": 1, "messages": [{"role": "user", "content":
"word " x 200000}]}` (1 MB) as fast as the node answers, for --seconds:

- http: with a valid agent token (an account of this node);
- p2p: as a stranger with a fresh key per thread and no token (quote, then a signed intent;
  once quotes are refused, the last 1 MB intent is posted again and again);
- anon: with no token at all (refused by authentication).

It reads the node process's CPU time (user + system, /proc) before and after, and prints the
CPU-seconds per minute the attack cost, the answers by status, and the CPU per request. The
attackers run in this process, on the same machine: on a small machine they compete with the
node, so the figure is what they managed to make the node spend, not a ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LONG = json.dumps({"max_tokens": 1, "messages": [{"role": "user", "content": "word " * 200_000}]})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(url: str, raw: bytes, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=raw, method="POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""  # the node closed the connection


def attacker(channel: str, node, model: str):  # noqa: ANN001, ANN201 (a closure per thread)
    from forge_cli import identity
    from forge_cli.mesh import protocol

    chat = node.url + "/v1/chat/completions"
    if channel == "http":
        token = node.agent(f"mallory-{secrets.token_hex(3)}")["token"]
        body = LONG.encode()
        return lambda: post(chat, body, token)[0]
    if channel == "anon":
        body = LONG.encode()
        return lambda: post(chat, body)[0]
    key = identity.Identity.generate()
    request = json.dumps({"model": model, **json.loads(LONG)})
    digest = protocol.sha256_hex(request.encode())
    tail = b', "request": ' + json.dumps(request).encode() + b"}"

    last: list[bytes] = []

    def p2p() -> int:
        status, raw = post(node.url + "/v1/forge/p2p/quote", json.dumps({
            "consumer": key.node_id, "model": model, "max_tokens": 1}).encode())
        if status != 200:  # refused a quote: post the last 1 MB intent again all the same
            return post(node.url + "/v1/forge/p2p/chat", last[0])[0] if last else status
        quote = json.loads(raw)
        intent = {"quote": quote["quote"], "quote_sig": quote["quote_sig"],
                  "nonce": secrets.token_hex(16), "request_sha256": digest,
                  "ts": int(time.time() * 1000)}
        head = json.dumps({"intent": intent,
                           "consumer_sig": key.sign(protocol.intent_message(intent)).hex()})
        last[:] = [head[:-1].encode() + tail]
        return post(node.url + "/v1/forge/p2p/chat", last[0])[0]

    return p2p


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channel", choices=("http", "p2p", "anon"), default="p2p")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from scratch import scratch_dir  # bench/scratch.py: removed however the run ends

    from tests.node_harness import NodeProcess

    work = scratch_dir("forge-stranger-cpu-")
    model = args.model
    if model is None:
        from tests.gguf_model import write_tiny_llama

        model = write_tiny_llama(work / "tiny-llama.gguf")
    with NodeProcess(work / "home", model, log=work / "node.log") as node:
        name = node.request("GET", "/health")[2]["models"][0]
        attacks = [attacker(args.channel, node, name) for _ in range(args.threads)]
        answers: Counter[int] = Counter()
        lock = threading.Lock()
        before, started = cpu_seconds(node.proc.pid), time.monotonic()
        deadline = started + args.seconds

        def hammer(attack) -> None:  # noqa: ANN001
            while time.monotonic() < deadline:
                status = attack()
                with lock:
                    answers[status] += 1

        threads = [threading.Thread(target=hammer, args=(a,)) for a in attacks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        spent, wall = cpu_seconds(node.proc.pid) - before, time.monotonic() - started
    requests = sum(answers.values())
    result = {"channel": args.channel, "threads": args.threads, "wall_s": round(wall, 1),
              "node_cpu_s": round(spent, 2),
              "node_cpu_s_per_minute": round(spent / wall * 60, 1),
              "requests": requests, "answers": dict(sorted(answers.items())),
              "node_cpu_ms_per_request": round(spent / max(1, requests) * 1000, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
