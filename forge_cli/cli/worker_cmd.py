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
    audit_every: int | None = typer.Option(
        None, "--audit-every", min=1, max=1_000_000,
        help="Audit one purchase in N when the model's GGUF is on this disk (default: "
        "audit.every; 1 audits every purchase)."),
    no_audit: bool = typer.Option(False, "--no-audit", help="Never audit purchases."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Print each purchase's audit (to stderr): trade seq, "
                                 "verdict, positions checked."),
    interface: list[str] = InterfaceOpt,
    peer: list[str] = PeerOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """Buy inference from a seller on the mesh and pay for it with this node's CU.

    Finds sellers (mDNS and --peer), picks one by --mode and gets its signed quote.

    Sends the request with a signed intent; checks the signed terms against the quote and the reply.

    Countersigns, and both ledgers (this FORGE_HOME's and the seller's) record the dual-signed trade.

    The reply goes to stdout; the seller, the CU paid and the balance left to stderr.

    When the model's GGUF is on this disk (embedded, pulled, or -m PATH) one purchase in
    --audit-every is audited with it: one scoring pass, recorded as an `audit` entry, or a
    signed `dispute` sent to the peers this worker knows.

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
    scoring, note, sha256 = _scoring_model(model, no_audit)
    if verbose:
        every = audit_every or config.get("audit.every")
        sys.stderr.write(f"audit: {note}" + (f", one purchase in {every}" if scoring else "")
                         + "\n")
    report = _Report(verbose, scoring, audit_every or config.get("audit.every"))
    asyncio.run(_main(text, model, seller, mode, settings, system, wait, retries, as_json,
                      interface, peer, config.ledger_path(ledger), scoring, audit_every,
                      sha256, report))


def _scoring_model(model: str | None, no_audit: bool):  # noqa: ANN202
    """(the local GGUF purchases of `model` are audited with or None, what -v says of it,
    the GGUF's sha256 when `model` is a path: sellers of that file are matched by it)."""
    from forge_cli.errors import ForgeError
    from forge_cli.inference import catalog, identity
    from forge_cli.mesh.worker import ScoringModel

    if model is None:
        return None, "off (no -m MODEL: the worker audits only a model it names)", None
    try:
        ref = catalog.resolve(model)
        path = catalog.local_file(ref, prepare=True)
    except ForgeError:
        ref, path = None, None
    if path is None:
        return None, f"off (no GGUF of {display.plain(model)} on this disk)", None
    sha256 = identity.sha256_file(path) if ref is not None and ref.kind == "path" else None
    if no_audit:
        return None, "off (--no-audit)", sha256
    scoring = ScoringModel(path, sha256 or identity.sha256_file(path),
                           n_ctx=config.get("models.n_ctx"),
                           threads=config.get("engine.threads"))
    return scoring, f"with {path} (sha256 {scoring.sha256[:16]}…)", sha256


class _Report:
    """What `-v` prints of a purchase's audit: one line."""

    def __init__(self, verbose: bool, scoring, every: int) -> None:  # noqa: ANN001
        self.verbose = verbose
        self.scoring = scoring
        self.every = every

    def __call__(self, purchase) -> None:  # noqa: ANN001
        if not self.verbose:
            return
        sys.stderr.write(audit_line(purchase, self.scoring, self.every) + "\n")


def audit_line(purchase, scoring, every: int) -> str:  # noqa: ANN001
    """One line: the trade's seq, the verdict, the positions checked, where it was recorded."""
    head = f"audit: trade seq {purchase.trade_seq}"
    entry = purchase.audit
    if entry is None:
        if scoring is None:
            return f"{head} · not audited (auditing is off)"
        if purchase.terms["model_sha256"] != scoring.sha256:
            return (f"{head} · not audited (the seller's GGUF "
                    f"{purchase.terms['model_sha256'][:16]}… is not the one on this disk)")
        return f"{head} · not audited (not drawn: one purchase in {every} is)"
    if entry.kind == "audit":
        return (f"{head} · passed · {entry.data['positions']} positions checked · "
                f"audit seq {entry.seq}")
    claim = entry.data["claim"]
    failing = ", ".join(str(f["pos"]) for f in claim["failures"][:8]) or "-"
    return (f"{head} · DISPUTED · {claim['positions']} positions checked · dispute seq "
            f"{entry.seq} · {display.plain(claim['reason'][:200])} · failing positions "
            f"{failing}")


async def _main(text, model, seller, mode, settings, system, wait, retries, as_json,  # noqa: ANN001
                interfaces, peers, ledger_path, scoring, audit_every, sha256,  # noqa: ANN001
                report) -> None:  # noqa: ANN001
    import asyncio

    from forge_cli.mesh.worker import Worker

    async with Worker(ledger_path, interfaces=interfaces or None, peers=peers,
                      audit_with=scoring, audit_every=audit_every) as w:
        sellers = await w.find(None if sha256 else model, seller, wait, sha256=sha256)
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        if text is not None:
            await _turn(w, sellers, history, text, mode, settings, retries, as_json, report)
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
                await _turn(w, sellers, history, line, mode, settings, retries, False, report)
            except UsageError:
                raise
            except Exception as exc:  # a failed purchase leaves the REPL running
                from forge_cli.cli.output import print_error
                from forge_cli.errors import ForgeError

                if not isinstance(exc, ForgeError):
                    raise
                print_error(exc)
                history.pop()


async def _turn(w, sellers, history, text, mode, settings, retries, as_json,  # noqa: ANN001
                report) -> None:  # noqa: ANN001
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
            "terms": terms, "audit": _audit_json(purchase.audit)}, sort_keys=True) + "\n")
        report(purchase)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    sys.stderr.write(
        f"[{display.plain(terms['model'])} from {purchase.seller.short()} · {terms['completion_tokens']} "
        f"tokens · {terms['cu']} CU at {terms['price_ucu_per_token'] / 1e6:g} CU/token · "
        f"balance {purchase.balance:,} CU · trade seq {purchase.trade_seq}]\n")
    report(purchase)


def _audit_json(entry) -> dict | None:  # noqa: ANN001
    """The purchase's audit for --json: None when it was not audited."""
    if entry is None:
        return None
    if entry.kind == "audit":
        return {"seq": entry.seq, "kind": "audit", "verdict": "passed",
                "positions": entry.data["positions"]}
    claim = entry.data["claim"]
    return {"seq": entry.seq, "kind": "dispute", "verdict": entry.data["verdict"],
            "positions": claim["positions"], "reason": claim["reason"],
            "failing_positions": [f["pos"] for f in claim["failures"]]}
