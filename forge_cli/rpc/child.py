"""The head's engine process: the split model loaded with the layer peers as RPC devices.

llama.cpp aborts the whole process when an RPC server's connection breaks mid-graph, so the
head runs the split model here, in a child of the node (`python -m forge_cli.rpc.child FD`),
and talks to it over a socket: a lost peer kills this process, and the node fails the requests
it was serving, by the peer's name, and reloads without it.

Messages (pickled, multiprocessing.connection framing):
  node → child: ("load", config) · ("chat", id, messages, sampling, tools) ·
                ("generate", id, prompt, sampling, add_bos) · ("cancel", id) · ("close",)
  child → node: ("ready", describe) | ("failed", error class, message) ·
                ("start", id, prompt tokens) · ("text", id, piece, tokens) ·
                ("done", id, Completion) · ("error", id, error class, message)
"""

from __future__ import annotations

import re
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

ASSIGNED = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")


class Child:
    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.lock = threading.Lock()
        self.streams: dict[int, Any] = {}
        self.engine: Any = None

    def send(self, *msg: Any) -> None:
        with self.lock:
            self.pipe.send(msg)

    def load(self, config: dict[str, Any]) -> None:
        from forge_cli.inference import engine as engines
        from forge_cli.rpc import ggml

        for endpoint in config["endpoints"]:
            ggml.add_server(endpoint)
        assigned: dict[int, str] = {}  # layer → device, as llama.cpp reports it (debug log)

        def watch(level: int, text: str) -> None:
            match = ASSIGNED.search(text)
            if match:
                assigned[int(match[1])] = match[2]

        engines.LOG_WATCHERS.append(watch)
        try:
            self.engine = engine = engines.Engine(
                config["path"], name=config["name"], n_ctx=config["n_ctx"],
                n_threads=config["n_threads"], n_threads_batch=config["n_threads_batch"],
                slots=config["slots"], n_gpu_layers=config["n_gpu_layers"],
                tensor_split=config["tensor_split"], queue_size=config["queue_size"])
        finally:
            engines.LOG_WATCHERS.remove(watch)
        self.send("ready", {**engine.describe(), "load_s": engine.load_s, "name": engine.name,
                            "assigned": assigned, "n_threads": engine.n_threads,
                            "n_threads_batch": engine.n_threads_batch,
                            "template_origin": engine.template.origin})

    def run(self, job: int, kind: str, args: tuple[Any, ...]) -> None:
        engine = self.engine
        try:
            if kind == "chat":
                messages, sampling, tools = args
                prompt = engine.render(messages, tools)
                stream = engine.chat(messages, sampling, tools=tools, block=False)
            else:
                prompt, sampling, add_bos = args
                stream = engine.generate(prompt, sampling, add_bos=add_bos, block=False)
            self.streams[job] = stream
            self.send("start", job, len(engine.tokenize(prompt, add_bos=kind != "chat")))
            for piece in stream:
                self.send("text", job, piece, stream.tokens)
            self.send("done", job, stream.completion)
        except Exception as exc:
            self.send("error", job, type(exc).__name__, str(exc))
        finally:
            self.streams.pop(job, None)

    def serve(self) -> None:
        while True:
            try:
                msg = self.pipe.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "load":
                try:
                    self.load(msg[1])
                except Exception as exc:
                    self.send("failed", type(exc).__name__, str(exc))
                    break
            elif kind in ("chat", "generate"):
                threading.Thread(target=self.run, args=(msg[1], kind, msg[2:]),
                                 name=f"forge-split-job-{msg[1]}", daemon=True).start()
            elif kind == "cancel":
                stream = self.streams.get(msg[1])
                if stream is not None:
                    stream.cancel()
            elif kind == "close":
                break
        if self.engine is not None:
            self.engine.close()


def main(argv: list[str]) -> None:
    Child(Connection(int(argv[1]))).serve()


if __name__ == "__main__":
    main(sys.argv)
