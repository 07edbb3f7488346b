"""`forge chat`: one-shot or REPL chat with a local model, streamed to the terminal."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import typer

from forge_cli import config, display
from forge_cli.config import TOKENS_MAX
from forge_cli.errors import ForgeError, UsageError

ThreadsOpt = typer.Option(None, "--threads", min=1, max=1024,
                          help="Threads llama.cpp runs on [default: engine.threads; "
                          "0 there means one per physical core].")


def chat(
    prompt: list[str] | None = typer.Argument(None, help="The prompt; stdin is joined before it."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Model name or .gguf path [default: models.default]."),
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt."),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", "-n", min=1, max=TOKENS_MAX,
        help="Most tokens to generate [default: chat.max_tokens]"
    ),
    temperature: float | None = typer.Option(None, "--temperature", "-t", min=0.0, max=2.0,
                                             help="Sampling temperature; 0 is greedy."),
    seed: int | None = typer.Option(None, "--seed", min=0, max=2**32 - 1,
                                     help="Sampling seed, for repeatable output."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the reply only when done."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: text, tokens, timings."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Tokens/s, time to first token and token counts on stderr."),
    node: str | None = typer.Option(None, "--node", envvar="FORGE_NODE",
                                    help="Buy the inference from a forge node at URL."),
    token: str | None = typer.Option(None, "--token", envvar="FORGE_TOKEN",
                                     help="Consumer token for --node (`forge wallet agent "
                                     "create NAME` makes one)."),
    no_pull: bool = typer.Option(False, "--no-pull",
                                 help="Refuse a model that is not on disk instead of pulling it."),
    threads: int | None = ThreadsOpt,
) -> None:
    """Chat with a local model: one-shot with a PROMPT (or stdin), a REPL without one on a TTY.

    A catalog model that is not on disk is pulled first (--no-pull refuses instead).

    Examples: forge chat "why is the sky blue?" · git diff | forge chat -s "describe this change"
    """
    if node:
        _buy(node, token, prompt, model, system, max_tokens, temperature, seed, no_stream,
             as_json, verbose)
        return
    from forge_cli.inference import download
    from forge_cli.inference.engine import Engine, Sampling

    settings = config.load()
    sampling = Sampling(
        max_tokens=max_tokens or settings["chat.max_tokens"],
        temperature=(settings["chat.temperature_milli"] / 1000 if temperature is None
                     else temperature),
        seed=seed,
    )
    interactive = not prompt and sys.stdin.isatty()
    text = None if interactive else _one_shot_prompt(prompt)
    ref, path = download.ensure_local(model or settings["models.default"], may_pull=not no_pull)
    # One conversation: one slot, so the context costs what a plain llama.cpp one does.
    engine = Engine(path, name=ref.name, n_ctx=settings["models.n_ctx"], slots=1,
                    n_threads=threads or settings["engine.threads"] or None,
                    n_threads_batch=settings["engine.threads_batch"] or None)
    try:
        if verbose:
            offload = f"yes ({engine.n_gpu_layers} layers)" if engine.gpu_offload else "no"
            sys.stderr.write(
                f"model {ref.name} ({path}) loaded in {engine.load_s * 1000:.0f} ms; "
                f"gpu offload: {offload}; {engine.n_threads} threads "
                f"({engine.n_threads_batch} for prompts); {engine.slots} slot; "
                f"context {engine.n_ctx}; template: {engine.template.origin}\n"
            )
        if interactive:
            _repl(engine, system, sampling, verbose)
        else:
            assert text is not None
            _one_shot(engine, path, system, text, sampling, no_stream, as_json, verbose)
    finally:
        engine.close()


def _buy(url, token, prompt, model, system, max_tokens, temperature, seed, no_stream,  # noqa: ANN001
         as_json, verbose) -> None:  # noqa: ANN001
    """One-shot chat bought from a node: stream the reply, then the CU cost and new balance."""
    import time

    from forge_cli.client import Client, default_token

    if not prompt and sys.stdin.isatty():
        raise UsageError("--node needs a prompt (argument or stdin); the REPL runs locally",
                         hint='forge chat --node URL "your question"')
    text = _one_shot_prompt(prompt)
    settings = config.load()
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": text}]
    payload = {"messages": messages,
               "max_tokens": max_tokens or settings["chat.max_tokens"],
               "temperature": (settings["chat.temperature_milli"] / 1000 if temperature is None
                               else temperature)}
    if model:
        payload["model"] = model
    if seed is not None:
        payload["seed"] = seed
    client = Client(url, token or default_token())
    show = not (no_stream or as_json)
    pieces: list[str] = []
    final: dict = {}
    started = time.perf_counter()
    first = None
    for chunk in client.stream_chat(payload):
        delta = chunk["choices"][0].get("delta", {}).get("content") if chunk["choices"] else None
        if delta:
            first = first or time.perf_counter()
            pieces.append(delta)
            if show:  # a node's (or its peer's) words: shown, never obeyed by the terminal
                sys.stdout.write(display.plain(delta, lines=True))
                sys.stdout.flush()
        if "x_forge" in chunk:
            final = chunk
    reply = "".join(pieces)
    x_forge = final.get("x_forge", {})
    usage = final.get("usage", {})
    if as_json:
        sys.stdout.write(display.json_text(json.dumps(
            {"text": reply, "model": final.get("model"), "usage": usage, "x_forge": x_forge},
            ensure_ascii=False, sort_keys=True)) + "\n")
    else:
        sys.stdout.write(("" if show else display.plain(reply, lines=True)) + "\n")
        sys.stderr.write(f"cost {x_forge.get('cu_cost')} CU at "
                         f"{x_forge.get('price_ucu_per_token', 0) / 1e6:.2f} CU/token · balance "
                         f"{x_forge.get('balance')} CU · trade #{x_forge.get('trade_seq')}\n")
    if verbose:
        elapsed = time.perf_counter() - started
        ttft = (first - started) * 1000 if first else 0
        sys.stderr.write(f"{usage.get('completion_tokens', 0)} tokens in {elapsed:.2f} s, "
                         f"first token {ttft:.0f} ms (over HTTP)\n")
        _split_of(client, final.get("model"))


def _split_of(client, model: str | None) -> None:  # noqa: ANN001
    """Which peer runs which layers, when the node splits the model across machines."""
    from forge_cli.cli.node_cmd import split_lines
    from forge_cli.errors import ForgeError

    try:
        served = client.get("/v1/models").get("data", [])
    except ForgeError:
        return
    for entry in served:
        split = entry.get("engine", {}).get("split") if entry.get("id") == model else None
        if split:
            sys.stderr.write(split_lines(split).replace("  split     ", "layers: ", 1)
                             .replace("\n            ", "\n        ") + "\n")


def _one_shot_prompt(prompt: list[str] | None) -> str:
    from forge_cli.inference.chat import join_prompt

    piped = None if sys.stdin.isatty() else sys.stdin.read()
    return join_prompt(prompt, piped)


def _one_shot(engine, path: Path, system, text, sampling, no_stream, as_json, verbose) -> None:  # noqa: ANN001
    from forge_cli.inference.chat import Conversation

    conversation = Conversation(system=system)
    stream = conversation.ask(engine, text, sampling)
    show = not (no_stream or as_json)
    pieces: list[str] = []
    interrupted = False
    try:
        for piece in stream:
            pieces.append(piece)
            if show:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
        interrupted = True
    result = stream.completion
    if as_json:
        data = result.as_dict() if result else {"text": "".join(pieces)}
        data.update(model=engine.name, model_path=str(path), gpu_offload=engine.gpu_offload,
                    n_gpu_layers=engine.n_gpu_layers, load_ms=round(engine.load_s * 1000, 3),
                    threads=engine.n_threads, threads_batch=engine.n_threads_batch)
        if interrupted:
            data["finish_reason"] = "cancelled"
        sys.stdout.write(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n")
    else:
        if not show:
            sys.stdout.write("".join(pieces))
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose and result is not None:
        _report(result)
    if interrupted:
        sys.stderr.write("(stopped)\n")
        raise typer.Exit(130)


def _report(result) -> None:  # noqa: ANN001
    sys.stderr.write(
        f"prompt      {result.prompt_tokens} tokens in {result.prompt_s * 1000:.1f} ms "
        f"({result.prompt_tokens_per_s:.1f} tokens/s)\n"
        f"completion  {result.completion_tokens} tokens in {result.generation_s * 1000:.1f} ms "
        f"({result.tokens_per_s:.1f} tokens/s), finish: {result.finish_reason}\n"
        f"first token {result.time_to_first_token_s * 1000:.1f} ms\n"
    )


def _repl(engine, system, sampling, verbose) -> None:  # noqa: ANN001
    from forge_cli.cli.output import print_error
    from forge_cli.inference.chat import REPL_HELP, Conversation, MultiLine, parse_line

    history = _open_history()
    conversation = Conversation(system=system)
    collector = MultiLine()
    sys.stderr.write(f"forge chat with {engine.name} — /help for commands, /exit to leave\n")
    armed = False  # a Ctrl-C at an empty prompt arms the exit; a second one leaves
    end = ""
    while True:
        try:
            line = input("... " if collector.pending else ">>> ")
        except EOFError:
            sys.stderr.write("\n")
            break
        except KeyboardInterrupt:
            if armed:
                end = "\n"
                break
            collector = MultiLine()
            armed = True
            try:
                sys.stderr.write("\n(Ctrl-C again or /exit to leave)\n")
            except KeyboardInterrupt:  # the second press came before the hint was out
                end = "\n"
                break
            continue
        armed = False
        message = collector.feed(line)
        if message is None:
            continue
        try:
            command = parse_line(message)
        except ForgeError as exc:
            print_error(exc)
            continue
        if command.name == "exit":
            break
        if command.name == "help":
            sys.stderr.write(REPL_HELP + "\n")
            continue
        if command.name == "reset":
            conversation.reset()
            sys.stderr.write("(conversation forgotten)\n")
            continue
        if command.name == "system":
            conversation.system = command.text or None
            said = "set" if command.text else "cleared"
            sys.stderr.write(f"(system prompt {said})\n")
            continue
        if not command.text.strip():
            continue
        _repl_turn(engine, conversation, command.text, sampling, verbose)
    # Leaving is decided: a Ctrl-C pressed again while the model unloads must not turn a
    # clean exit into an interrupted one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stderr.write(end)
    _close_history(history)


def _repl_turn(engine, conversation, text, sampling, verbose) -> None:  # noqa: ANN001
    from forge_cli.cli.output import print_error

    pieces: list[str] = []
    stream = None
    try:
        stream = conversation.ask(engine, text, sampling)
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        if stream is None:
            conversation.forget_last_question()
            return
        stream.cancel()
        sys.stdout.write("\n")
        sys.stderr.write("(stopped)\n")
        conversation.answered("".join(pieces))
        return
    except ForgeError as exc:
        sys.stdout.write("\n")
        print_error(exc)
        conversation.forget_last_question()
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    conversation.answered("".join(pieces))
    if verbose and stream.completion is not None:
        _report(stream.completion)


def _open_history() -> Path | None:
    try:
        import readline  # line editing and history for input()
    except ImportError:  # not every Python has it; input() still works
        return None
    path = config.home() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    return path


def _close_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass
