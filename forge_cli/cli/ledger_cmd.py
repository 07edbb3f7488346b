"""`forge ledger`: the record, for people and shell scripts."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from forge_cli import config
from forge_cli.cli.output import print_json, print_jsonl
from forge_cli.config import INT_MAX
from forge_cli.errors import CheckFailed, ProofFailed, TamperDetected, UsageError

app = typer.Typer(
    help="Verify, inspect, prove and move the ledger. "
    "Exit codes: 0 valid, 1 invalid (tamper, bad proof), 2 usage, I/O or lock error.",
    no_args_is_help=True,
)

EXPORT_FORMAT = "forge-ledger-export"
LedgerOpt = typer.Option(None, "--ledger", help="Ledger file (default: FORGE_HOME/ledger.db).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")


@contextlib.contextmanager
def _reader(path: Path | None) -> Iterator[Any]:
    from forge_cli.ledger.store import Ledger

    with Ledger.open_reader(config.ledger_path(path)) as ledger:
        yield ledger


@contextlib.contextmanager
def _writer(path: Path | None) -> Iterator[Any]:
    from forge_cli import identity
    from forge_cli.ledger.store import Ledger

    signer = identity.load_or_create()
    with Ledger.open_writer(config.ledger_path(path), signer,
                            synchronous=config.get("ledger.synchronous")) as ledger:
        yield ledger


def _short(text: str, width: int = 12) -> str:
    return text if len(text) <= width else text[:width] + "…"


def _when(ts_ms: int) -> str:
    return datetime.datetime.fromtimestamp(ts_ms / 1000, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S")


def _summary(fields: dict[str, Any]) -> str:
    data, kind = fields["data"], fields["kind"]
    if kind in ("grant", "burn"):
        return f"{data['cu']} CU {'to' if kind == 'grant' else 'from'} {_short(data['account'])}"
    if kind == "transfer":
        return f"{data['cu']} CU {_short(data['from'])} → {_short(data['to'])}"
    if kind == "trade":
        t = data["terms"]
        return (f"{t['cu']} CU {_short(t['consumer'])} → {_short(t['provider'])} "
                f"{t['model']} {t['completion_tokens']} tok")
    if kind == "redact":
        return f"body {_short(data['body'])}"
    if kind == "agent":
        return f"{data['run']} {data['step']:<7} {_agent_step(data)}"
    return _short(json.dumps(data, ensure_ascii=False, sort_keys=True), 60)


def _agent_step(d: dict[str, Any]) -> str:
    """One agent step in a line: what it did, what it cost, which entries it used."""
    step = d["step"]
    if step == "request":
        limits = ", ".join(x for x in (
            f"budget {d['budget_cu']} CU" if d["budget_cu"] is not None else "",
            f"max {d['max_calls']} calls" if d["max_calls"] is not None else "") if x)
        resumes = f", resumes {d['resumes']}" if d["resumes"] else ""
        return f"by {_short(d['account'])} on {d['model']}" + (f", {limits}" if limits else "") + resumes
    if step == "plan":
        paid = f", {d['cu']} CU trade {d['trade']}" if d["trade"] is not None else ""
        return f"{d['tasks']} tasks in {d['waves']} waves by {d['planner']}{paid}"
    if step == "task":
        if d["reuse"] is not None:
            return f"{d['task']} wave {d['wave']}: reuses the result passed at verdict {d['reuse']}"
        inputs = f", inputs {','.join(map(str, d['inputs']))}" if d["inputs"] else ""
        return f"{d['task']} wave {d['wave']} attempt {d['attempt']} on {d['model']}{inputs}"
    if step == "result":
        return (f"{d['task']}: {d['completion_tokens']} tok, {d['cu']} CU"
                + (f", trade {d['trade']}" if d["trade"] is not None else ""))
    if step == "verdict":
        return f"{d['task']}: {'pass' if d['ok'] else 'FAIL'} ({_short(d['reason'], 50)})"
    if step == "answer":
        return f"{d['cu']} CU, trade {d['trade']}, from results {','.join(map(str, d['inputs']))}"
    if step == "stop":
        return f"[{d['gate']}] {_short(d['reason'], 70)}"
    if step == "route":
        return f"{d['task']} → {d['lane']} by {d['method']}"
    if step == "intent":
        missing = f", missing {','.join(d['missing'][:5])}" if d["missing"] else ""
        return (f"coverage {d['coverage_pm'] / 10:.0f} %{' FLAGGED' if d['flagged'] else ''}"
                f"{missing}")
    if step == "verification":
        return f"{'ok' if d['ok'] else 'FAIL'} by {_short(d['source'], 40)}"
    return f"[{d['stage']}] {_short(d['reason'], 70)}"


@app.command()
def verify(
    deep: bool = typer.Option(False, "--deep", help="Also re-hash bodies and rebuild every "
                              "table (balances, nonces, Merkle nodes) by replay."),
    as_json: bool = typer.Option(False, "--json", help="Print every finding as JSON."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="A checkpoint saved earlier (`forge ledger checkpoint > "
        "cp.txt`): the ledger must still extend it, which catches a truncated tail."),
    key: str | None = typer.Option(None, "--key", help="Verifier key (vkey) for --checkpoint; "
                                   "default: the node named by its origin."),
    witnesses: int | None = typer.Option(
        None, "--witnesses", min=1, max=16, help="With --checkpoint: exit 1 unless at least N "
        "known witnesses cosigned it."),
    witness_keys: Path | None = typer.Option(
        None, "--witness-keys", help="Witness verifier keys (vkeys), one a line, # comments; "
        "default: the mesh peers this node gossips with (FORGE_HOME/network.db)."),
    ledger: Path | None = LedgerOpt,
) -> None:
    """Check every entry, signature and checkpoint. Exit 0 valid, 1 invalid, 2 cannot check.

    On failure the first bad seq and the reason go to stderr:

        forge ledger verify || echo "ledger tampered"

    With --witnesses N, the saved checkpoint must also carry N cosignatures by known witnesses:

        forge ledger checkpoint > cp.txt; forge ledger verify --checkpoint cp.txt --witnesses 2
    """
    from forge_cli.ledger import verify as verifier

    saved, cosigned = None, None
    if witnesses is not None and checkpoint is None:
        raise UsageError("--witnesses counts the cosignatures of a checkpoint; pass "
                         "--checkpoint FILE")
    if checkpoint is not None:
        try:
            text = checkpoint.read_text(encoding="utf-8")
            saved = verifier.open_saved_checkpoint(text, key)
        except OSError as exc:
            raise UsageError(f"cannot read checkpoint file {checkpoint}: {exc.strerror}") from exc
        except ProofFailed as exc:
            raise ProofFailed(f"saved checkpoint {checkpoint}: {exc}") from None
        if witnesses is not None:
            cosigned = _cosigners(text, witness_keys)
    with _reader(ledger) as book:
        report = verifier.verify(book, deep=deep, saved=saved)
    short = cosigned is not None and witnesses is not None and len(cosigned) < witnesses
    if as_json:
        print_json(report.to_json() | ({} if cosigned is None else {
            "witnesses": [v.vkey() for v in cosigned], "witnesses_required": witnesses}))
    elif report.ok and not short:
        typer.echo(f"ledger valid: {report.size} entries, root {report.root}, "
                   f"{report.signatures} signatures, {report.checkpoints} checkpoints"
                   + (", all tables rebuilt and equal" if deep else "")
                   + ("" if cosigned is None else
                      f"; the checkpoint is cosigned by {len(cosigned)} known witnesses"))
    if report.ok and short:
        assert cosigned is not None
        names = ", ".join(v.name for v in cosigned) or "none"
        message = (f"checkpoint {checkpoint} is cosigned by {len(cosigned)} known witnesses "
                   f"({names}); {witnesses} are required")
        if as_json:
            sys.stderr.write(f"forge: {message}\n")
            raise typer.Exit(CheckFailed.exit_code)
        raise CheckFailed(message)
    if not report.ok:
        first = report.findings[0]
        more = len(report.findings) - 1
        message = f"ledger invalid: {first}" + (
            f" (and {more} more finding{'s' if more > 1 else ''}; --json lists all)" if more else "")
        if as_json:
            sys.stderr.write(f"forge: {message}\n")
            raise typer.Exit(TamperDetected.exit_code)
        raise TamperDetected(message)


@app.command()
def show(
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=INT_MAX,
                              help="How many of the newest entries."),
    kind: str | None = typer.Option(None, "--kind", "-k", help="Only entries of this kind."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """The newest entries, oldest first."""
    with _reader(ledger) as book:
        if kind is None:
            start = max(0, book.size - limit)
            shown = list(book.iter_entries(start))
        else:
            shown = list(book.iter_entries(kind=kind))[-limit:]
    if as_json:
        print_json([e.to_json() for e in shown])
        return
    if not shown:
        typer.echo("no entries" + (f" of kind {kind!r}" if kind else ""))
        return
    for e in shown:
        f = e.fields
        parent = f" ←{f['parent']}" if f["parent"] is not None else ""
        typer.echo(f"{f['seq']:>7}  {_when(f['ts'])}  {f['kind']:<9} {_summary(f)}{parent}")


@app.command()
def get(
    seq: int = typer.Argument(..., min=0, max=INT_MAX, help="Entry number."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """One entry with its hash, signature and the state of its bodies."""
    with _reader(ledger) as book:
        entry = book.entry(seq)
        bodies = {}
        for body in entry.fields["bodies"]:
            data = book.body(body)
            redacted = book.redacted_at(body)
            bodies[body] = (f"redacted at seq {redacted}" if redacted is not None else
                            "missing" if data is None else f"{len(data)} bytes")
    out = entry.to_json() | {"body_status": bodies}
    if as_json:
        print_json(out)
        return
    typer.echo(json.dumps(entry.fields, indent=2, ensure_ascii=False, sort_keys=True))
    typer.echo(f"hash  {entry.hash.hex()}\nsig   {entry.sig.hex()}")
    for body, status in bodies.items():
        typer.echo(f"body  {body}  {status}")


@app.command()
def replay(
    until: int | None = typer.Option(None, "--until", min=0, max=INT_MAX,
                                     help="Last seq to include (default: all)."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """Rebuild the state (balances, supply, counts) from the entries alone, up to a seq."""
    from forge_cli.errors import EntryRejected
    from forge_cli.ledger import views

    with _reader(ledger) as book:
        end = book.size if until is None else until + 1
        if not 0 < end <= book.size:
            raise UsageError(f"--until {until} is outside the ledger's seq 0..{book.size - 1}")
        state = views.MemoryState()
        kinds: Counter[str] = Counter()
        for entry in book.iter_entries(0, end):
            kinds[entry.kind] += 1
            try:
                state.apply(entry.fields)
            except EntryRejected as exc:
                raise TamperDetected(f"replay stops at seq {entry.seq}: {exc}") from None
        root = book.root(end).hex()
    result = {
        "size": end, "root": root, "balances": state.balances(), "supply": state.supply(),
        "kinds": dict(kinds), "trades": kinds["trade"],
        "redacted_bodies": len(state.tables[views.REDACTIONS.table]),
        "escrow": sum(v[0] for v in state.tables[views.ESCROW.table].values()),
        "pool": dict(zip(("cash", "lent", "shares"), views.pool_row(state))),
    }
    if as_json:
        print_json(result)
        return
    typer.echo(f"state after seq {end - 1} ({end} entries), root {root}")
    typer.echo(f"supply   granted {result['supply']['granted']} CU, burned "
               f"{result['supply']['burned']} CU")
    typer.echo(f"lending  pool {result['pool']['cash']} CU cash + {result['pool']['lent']} CU lent, "
               f"escrow {result['escrow']} CU")
    typer.echo("kinds    " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    for account, balance in sorted(result["balances"].items(), key=lambda kv: -kv[1]):
        typer.echo(f"  {account}  {balance:>12} CU")


@app.command()
def root(as_json: bool = JsonOpt, ledger: Path | None = LedgerOpt) -> None:
    """Tree size and Merkle root (RFC 9162) of the ledger as it is now."""
    with _reader(ledger) as book:
        size, digest = book.size, book.root()
    if as_json:
        print_json({"size": size, "root": digest.hex(),
                    "root_base64": base64.b64encode(digest).decode()})
    else:
        typer.echo(f"{size} {digest.hex()}")


def _cosigners(text: str, keys_file: Path | None) -> list[Any]:
    """The known witnesses whose cosignature on the checkpoint note verifies."""
    from forge_cli.ledger import note, witness

    if keys_file is not None:
        try:
            lines = keys_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read witness keys {keys_file}: {exc}") from exc
        keys = [note.Verifier.parse(line) for line in lines
                if line.strip() and not line.lstrip().startswith("#")]
        if any(k.sig_type != note.COSIGNATURE_V1 for k in keys):
            raise UsageError(f"{keys_file} holds a key that is not a cosignature/v1 key "
                             "(type 0x04)")
    else:
        from forge_cli.mesh.network import NetworkView

        path = config.home() / "network.db"
        ids = []
        if path.exists():
            view = NetworkView.open(path)
            try:
                ids = view.peer_ids()
            finally:
                view.close()
        keys = [witness.witness_verifier(node_id) for node_id in ids]
    return witness.cosigners(text, keys)


@app.command()
def checkpoint(as_json: bool = JsonOpt, ledger: Path | None = LedgerOpt) -> None:
    """Sign and store a checkpoint (C2SP signed note) of the current tree, and print it with
    the cosignatures witnesses (mesh peers) gave it. While a node holds the ledger, the newest
    checkpoint it signed is printed instead.

    Save it outside the ledger to catch truncation later:

        forge ledger checkpoint > cp.txt; forge ledger verify --checkpoint cp.txt
    """
    from forge_cli.errors import LedgerLocked
    from forge_cli.ledger import witness

    try:
        with _writer(ledger) as book:
            text = book.checkpoint()
            size, root, _, vkey = book.latest_checkpoint()
            full, cosigs, now = (witness.with_cosignatures(book, text),
                                 witness.cosignatures(book, size), book.size)
    except LedgerLocked as locked:
        with _reader(ledger) as book:
            latest = book.latest_checkpoint()
            if latest is None:
                raise LedgerLocked(f"{locked.message}, and it has signed no checkpoint yet",
                                   hint="a running node signs one when a peer or a reader "
                                   "asks for it (`GET /ledger/checkpoint`)") from None
            size, root, text, vkey = latest
            full, cosigs, now = (witness.with_cosignatures(book, text),
                                 witness.cosignatures(book, size), book.size)
        sys.stderr.write(f"a running node holds the ledger: this is the newest checkpoint it "
                         f"signed (size {size}; the ledger has {now} entries)\n")
    if as_json:
        print_json({"size": size, "root": bytes(root).hex(), "note": full, "vkey": vkey,
                    "cosignatures": [{"witness": w, "time": ts} for w, _, ts in cosigs]})
        return
    sys.stdout.write(full)
    sys.stderr.write(f"verifier key: {vkey}\n")
    if cosigs:
        sys.stderr.write(f"cosigned by {len(cosigs)} witness(es): "
                         + ", ".join(w.split("+", 1)[0] for w, _, _ in cosigs) + "\n")


@app.command()
def prove(
    seq: int = typer.Argument(..., min=0, max=INT_MAX, help="Entry to prove."),
    size: int | None = typer.Option(None, "--size", min=1, max=INT_MAX, help="Tree size (default: current)."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """Inclusion proof that entry SEQ is in the tree of the given size (RFC 9162 §2.1.3)."""
    from forge_cli.ledger import merkle

    with _reader(ledger) as book:
        tree = book.size if size is None else size
        proof = book.inclusion_proof(seq, tree)
        leaf, digest = book.entry(seq).hash, book.root(tree)
    if not merkle.verify_inclusion(leaf, seq, tree, proof, digest):
        raise ProofFailed(f"the inclusion proof for seq {seq} in size {tree} does not verify")
    out = {"seq": seq, "size": tree, "leaf_hash": leaf.hex(), "root": digest.hex(),
           "proof": [p.hex() for p in proof]}
    if as_json:
        print_json(out)
        return
    typer.echo(f"entry {seq} is in the tree of size {tree} with root {digest.hex()}")
    typer.echo(f"leaf  {leaf.hex()}")
    for i, node in enumerate(proof):
        typer.echo(f"  {i:>2}  {node.hex()}")


@app.command()
def consistency(
    old: int = typer.Argument(..., min=0, max=INT_MAX, help="Older tree size."),
    new: int = typer.Argument(..., min=0, max=INT_MAX, help="Newer tree size."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """Consistency proof that the size-OLD tree is a prefix of the size-NEW tree (§2.1.4)."""
    from forge_cli.ledger import merkle

    with _reader(ledger) as book:
        proof = book.consistency_proof(old, new)
        old_root, new_root = book.root(old), book.root(new)
    if not merkle.verify_consistency(old, new, old_root, new_root, proof):
        raise ProofFailed(f"the consistency proof {old} → {new} does not verify")
    out = {"old_size": old, "new_size": new, "old_root": old_root.hex(),
           "new_root": new_root.hex(), "proof": [p.hex() for p in proof]}
    if as_json:
        print_json(out)
        return
    typer.echo(f"tree {old} ({old_root.hex()}) is a prefix of tree {new} ({new_root.hex()})")
    for i, node in enumerate(proof):
        typer.echo(f"  {i:>2}  {node.hex()}")


@app.command()
def causal(
    seq: int = typer.Argument(..., min=0, max=INT_MAX, help="Entry whose causes and effects to trace."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """The chain of parents that led to SEQ, and the entries that name SEQ as parent."""
    with _reader(ledger) as book:
        chain = [book.entry(seq)]
        while chain[-1].fields["parent"] is not None:
            chain.append(book.entry(chain[-1].fields["parent"]))
        children = book.children(seq)
    if as_json:
        print_json({"seq": seq, "ancestors": [e.seq for e in chain[1:]], "children": children,
                    "chain": [e.to_json() for e in chain]})
        return
    for depth, e in enumerate(reversed(chain)):
        typer.echo(f"{'  ' * depth}{e.seq:>6}  {e.kind:<9} {_summary(e.fields)}")
    typer.echo("children: " + (", ".join(map(str, children)) if children else "none"))


@app.command()
def cosign(
    checkpoint: Path = typer.Argument(..., help="Another node's checkpoint note."),
    key: str = typer.Option(..., "--key", help="That log's verifier key (name+id+base64)."),
    proof: Path | None = typer.Option(
        None, "--proof", help="JSON from that node's `forge ledger consistency OLD NEW --json`, "
        "OLD being the size this node last cosigned; not needed the first time."),
    ledger: Path | None = LedgerOpt,
) -> None:
    """Witness another log: cosign its checkpoint if it extends the last one seen, and print it.

    Refuses (exit 1) a checkpoint that shrinks the log or is not consistent with the last
    one this node cosigned: that is how forks and rewritten history are caught.
    """
    try:
        text = checkpoint.read_text(encoding="utf-8")
        nodes = []
        if proof is not None:
            nodes = [bytes.fromhex(h) for h in json.loads(proof.read_text(encoding="utf-8"))["proof"]]
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{proof} is not the JSON of `forge ledger consistency --json`: {exc}") from exc
    from forge_cli.ledger.witness import witness as cosign

    with _writer(ledger) as book:
        sys.stdout.write(cosign(book, text, key, nodes))


@app.command("export")
def export_(ledger: Path | None = LedgerOpt) -> None:
    """Every entry as JSONL on stdout, with bodies (base64) and signatures.

    The first line is a header; the last carries the latest checkpoint, if any.
    """
    with _reader(ledger) as book:
        latest = book.latest_checkpoint()
        print_jsonl({"format": EXPORT_FORMAT, "version": 1, "size": book.size,
                     "root": book.root().hex()})
        for entry in book.iter_entries():
            bodies = {h: base64.b64encode(data).decode()
                      for h in entry.fields["bodies"] if (data := book.body(h)) is not None}
            print_jsonl({"entry": entry.fields, "hash": entry.hash.hex(), "sig": entry.sig.hex(),
                         "bodies": bodies})
        if latest is not None:
            print_jsonl({"checkpoint": latest[2], "vkey": latest[3]})


def _read_export(path: Path) -> tuple[dict[str, Any],
                                      list[tuple[bytes, bytes, dict[str, bytes]]],
                                      dict[str, Any] | None]:
    """Header, records and optional checkpoint trailer of an export file."""
    from forge_cli import canonical

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    records, trailer, lineno = [], None, 1
    try:
        header = json.loads(lines[0]) if lines else None
        if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
            raise ValueError("no forge-ledger-export header")
        for lineno, line in enumerate(lines[1:], start=2):  # noqa: B007 (used in the error)
            item = json.loads(line)
            if "checkpoint" in item:
                trailer = item
                continue
            bodies = {h: base64.b64decode(b, validate=True) for h, b in item["bodies"].items()}
            records.append((canonical.encode(item["entry"]), bytes.fromhex(item["sig"]), bodies))
    except (ValueError, KeyError, TypeError, AttributeError, UsageError) as exc:
        raise TamperDetected(f"{path} line {lineno} is not a forge export record ({exc}); "
                             "nothing was imported") from None
    return header, records, trailer


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="A file written by `forge ledger export`."),
    ledger: Path | None = LedgerOpt,
) -> None:
    """Verify an export and append what this ledger lacks; a file failing any check changes nothing.

    The export must extend this ledger: entries already held must be identical.
    """
    from forge_cli.errors import EntryRejected
    from forge_cli.ledger import note
    from forge_cli.ledger.importer import import_records

    header, records, trailer = _read_export(file)
    if header.get("size") != len(records):
        raise TamperDetected(f"{file} declares {header.get('size')} entries but holds "
                             f"{len(records)}; nothing was imported")
    expect = {}
    try:
        expect[len(records)] = bytes.fromhex(header["root"])
        if trailer is not None:
            cp = note.open_checkpoint(trailer["checkpoint"], note.Verifier.parse(trailer["vkey"]))
            expect.setdefault(cp.size, cp.root)
            if expect[cp.size] != cp.root:
                raise CheckFailed("its checkpoint and header disagree on the root")
    except (CheckFailed, UsageError, KeyError, ValueError, TypeError) as exc:
        raise TamperDetected(f"{file}: header or checkpoint does not verify ({exc}); "
                             "nothing was imported") from None
    with _writer(ledger) as book:
        start = book.size
        try:
            count = import_records(book, records, expect_roots=expect)
        except EntryRejected as exc:
            raise TamperDetected(f"{file}: {exc}") from None
    if count:
        typer.echo(f"imported {count} entries (seq {start}..{start + count - 1}); "
                   f"ledger now holds {start + count}")
    else:
        typer.echo(f"nothing to import: the ledger already holds all {start} entries")


anchor_app = typer.Typer(
    help="The Bitcoin anchor of the original Forge: a 40-byte OP_RETURN payload committing to "
    "the root of the newest signed checkpoint. No wallet, no network: the payload and its proof.",
    invoke_without_command=True,
)
app.add_typer(anchor_app, name="anchor")


@anchor_app.callback()
def anchor(
    ctx: typer.Context,
    network: str = typer.Option("mainnet", "--network",
                                help="mainnet, testnet, signet or regtest (the payload's 6th byte)."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """Print the OP_RETURN payload (hex) of the newest signed checkpoint, its script, and the
    checkpoint it commits to. Publish it with your own Bitcoin node (README: Anchoring)."""
    if ctx.invoked_subcommand is not None:
        return
    from forge_cli.errors import LedgerError
    from forge_cli.ledger import anchor as anchors
    from forge_cli.ledger import witness

    with _reader(ledger) as book:
        latest = book.latest_checkpoint()
        if latest is None:
            raise LedgerError("the ledger holds no signed checkpoint yet",
                              hint="sign one with `forge ledger checkpoint`")
        size, root, text, vkey = latest
        full = witness.with_cosignatures(book, text)
    made = anchors.anchor(bytes(root), network)
    out = {"network": made.network, "payload_hex": made.payload().hex(),
           "script_hex": made.script().hex(), "payload_len": len(made.payload()),
           "size": size, "root": bytes(root).hex(), "checkpoint": full, "vkey": vkey}
    if as_json:
        print_json(out)
        return
    typer.echo(f"payload  {out['payload_hex']}")
    typer.echo(f"script   {out['script_hex']}  (OP_RETURN, {made.network})")
    typer.echo(f"commits to the checkpoint of size {size}, root {out['root']}:")
    typer.echo(full, nl=False)


@anchor_app.command("verify")
def anchor_verify(
    payload: str = typer.Argument(..., help="The payload in hex (or the whole 6a28… script)."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="The checkpoint the payload commits to (default: one of the "
        "ledger's own signed checkpoints with that root)."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """Check that PAYLOAD commits to a signed checkpoint this ledger is consistent with.
    Exit 0 it does, 1 it does not, 2 the payload is malformed."""
    from forge_cli.ledger import anchor as anchors
    from forge_cli.ledger import note
    from forge_cli.ledger import verify as verifier

    made = anchors.parse(payload)
    with _reader(ledger) as book:
        if checkpoint is not None:
            try:
                cp = verifier.open_saved_checkpoint(checkpoint.read_text(encoding="utf-8"))
            except OSError as exc:
                raise UsageError(f"cannot read checkpoint file {checkpoint}: "
                                 f"{exc.strerror}") from exc
            if cp.root != made.root:
                raise ProofFailed(f"the payload commits to root {made.root.hex()}, not to the "
                                  f"root {cp.root.hex()} of checkpoint {checkpoint}")
        else:
            found = [(size, text, vkey) for size, root, text, vkey in book.checkpoints()
                     if bytes(root) == made.root]
            if not found:
                raise ProofFailed(f"no signed checkpoint of this ledger has root "
                                  f"{made.root.hex()}", hint="pass the one it commits to "
                                  "with --checkpoint FILE")
            cp = note.open_checkpoint(found[0][1], note.Verifier.parse(found[0][2]))
        if cp.size > book.size:
            raise ProofFailed(f"the checkpoint has {cp.size} entries but this ledger only "
                              f"{book.size}")
        if book.root(cp.size) != cp.root:
            raise ProofFailed(f"this ledger's first {cp.size} entries do not hash to the "
                              "anchored root: it is not the history the payload commits to")
        size = book.size
    out = {"valid": True, "network": made.network, "root": made.root.hex(),
           "checkpoint_size": cp.size, "origin": cp.origin, "ledger_size": size}
    if as_json:
        print_json(out)
        return
    typer.echo(f"anchor valid: {made.network} payload commits to {cp.origin} at size {cp.size} "
               f"(root {made.root.hex()}); this ledger's {size} entries extend it")


tiles_app = typer.Typer(help="The ledger as a C2SP tlog-tiles log (static files).",
                        no_args_is_help=True)
app.add_typer(tiles_app, name="tiles")


@tiles_app.command("export")
def tiles_export(
    directory: Path = typer.Argument(..., help="Folder to write checkpoint and tile/ into."),
    as_json: bool = JsonOpt,
    ledger: Path | None = LedgerOpt,
) -> None:
    """Write the tree of the latest signed checkpoint as C2SP tlog-tiles static files.

    Any static file server can then serve the log, e.g.:

        forge ledger tiles export site/ && python -m http.server -d site/
    """
    from forge_cli.ledger import tiles

    with _reader(ledger) as book:
        done = tiles.export(book, directory)
    if as_json:
        print_json({"directory": str(directory), "size": done.size, "files": done.files,
                    "bytes": done.bytes})
    else:
        typer.echo(f"wrote {done.files} files ({done.bytes:,} bytes) for the tree of "
                   f"{done.size} entries to {directory}")
