"""`forge worker`: buy inference from a seller on the mesh, one-shot or as a REPL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from forge_cli import config, display
from forge_cli.cli.node_cmd import InterfaceOpt, LedgerOpt, PeerOpt
from forge_cli.config import TOKENS_MAX
from forge_cli.errors import UsageError


def worker(
    prompt: list[str] | None = typer.Argument(None, help="The prompt; stdin is joined before it."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Model to buy (default: any the chosen seller "
                                     "sells)."),
    seller: str | None = typer.Option(None, "--seed",
                                      help="Buy only from this seller (node id or a prefix)."),
    mode: str = typer.Option("balanced", "--mode",
                             help="How to pick a seller: cost (cheapest), quality (largest "
                             "model) or balanced (price per reputation)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, max=TOKENS_MAX,
                                   help="Most tokens to buy (the quote's ceiling)."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", min=0.0, max=2.0,
                                      help="Sampling temperature; 0 is greedy."),
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt."),
    wait: float = typer.Option(5.0, "--wait", min=0.0, max=3600.0,
                               help="Seconds to look for a seller before giving up."),
    retries: int = typer.Option(1, "--retries", min=0, max=100,
                                help="Other sellers to try when one fails mid-request."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: text, provider, "
                                 "terms, CU, balance."),
    interface: list[str] = InterfaceOpt,
    peer: list[str] = PeerOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """Buy inference from a seller on the mesh and pay for it with this node's CU.

    Finds sellers (mDNS and --peer), picks one by --mode and gets its signed quote.

    Sends the request with a signed intent; checks the signed terms against the quote and the reply.

    Countersigns, and both ledgers (this FORGE_HOME's and the seller's) record the dual-signed trade.

    The reply goes to stdout; the seller, the CU paid and the balance left to stderr.

    Without a PROMPT on a terminal it is a REPL.

    Examples: forge worker -m smollm2:135m "hello" · echo "sum this" | forge worker --json
    """
    from forge_cli.mesh.protocol import MODES

    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, found {mode!r}")
    interactive = not prompt and sys.stdin.isatty()
    text = None
    if not interactive:
        from forge_cli.inference.chat import join_prompt

        text = join_prompt(prompt, None if sys.stdin.isatty() else sys.stdin.read())
    import asyncio  # here, not at the top: `forge --help` must not pay for it

    settings = {"max_tokens": max_tokens, "temperature": temperature}
    asyncio.run(_main(text, model, seller, mode, settings, system, wait, retries, as_json,
                      interface, peer, config.ledger_path(ledger)))


async def _main(text, model, seller, mode, settings, system, wait, retries, as_json,  # noqa: ANN001
                interfaces, peers, ledger_path) -> None:  # noqa: ANN001
    import asyncio

    from forge_cli.mesh.worker import Worker

    async with Worker(ledger_path, interfaces=interfaces or None, peers=peers) as w:
        sellers = await w.find(model, seller, wait)
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        if text is not None:
            await _turn(w, sellers, history, text, mode, settings, retries, as_json)
            return
        sys.stderr.write(f"forge worker — {len(sellers)} seller(s) found; /exit to leave\n")
        while True:
            try:
                line = await asyncio.to_thread(input, ">>> ")
            except EOFError:
                sys.stderr.write("\n")
                return
            if line.strip() in ("/exit", "/bye"):
                return
            if not line.strip():
                continue
            try:
                await _turn(w, sellers, history, line, mode, settings, retries, False)
            except UsageError:
                raise
            except Exception as exc:  # a failed purchase leaves the REPL running
                from forge_cli.cli.output import print_error
                from forge_cli.errors import ForgeError

                if not isinstance(exc, ForgeError):
                    raise
                print_error(exc)
                history.pop()


async def _turn(w, sellers, history, text, mode, settings, retries, as_json) -> None:  # noqa: ANN001
    history.append({"role": "user", "content": text})
    show = not as_json

    def piece(p: str) -> None:
        if show:  # a seller's words: shown, never obeyed as terminal commands
            sys.stdout.write(display.plain(p, lines=True))
            sys.stdout.flush()

    def retry(exc, nxt) -> None:  # noqa: ANN001
        sys.stderr.write(f"\n{display.plain(exc, lines=True)}\ntrying {nxt.short()}\n")

    purchase = await w.buy(sellers, {"messages": list(history), **settings}, mode=mode,
                           retries=retries, on_piece=piece, on_retry=retry)
    history.append({"role": "assistant", "content": purchase.text})
    terms = purchase.terms
    if as_json:
        sys.stdout.write(json.dumps({
            "text": purchase.text, "provider": terms["provider"], "url": purchase.seller.url,
            "model": terms["model"], "cu": terms["cu"], "balance": purchase.balance,
            "trade_seq": purchase.trade_seq, "provider_trade_seq": purchase.provider_trade_seq,
            "terms": terms}, sort_keys=True) + "\n")
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    sys.stderr.write(
        f"[{display.plain(terms['model'])} from {purchase.seller.short()} · {terms['completion_tokens']} "
        f"tokens · {terms['cu']} CU at {terms['price_ucu_per_token'] / 1e6:g} CU/token · "
        f"balance {purchase.balance:,} CU · trade seq {purchase.trade_seq}]\n")
