"""The ledger as C2SP tlog-tiles: paths, the leaf-size bound, the node's /ledger/ routes, and
`forge ledger tiles export`, checked by tlog-scales (tests/tlog_verify.py), a tiles client
published by someone else, over HTTP from a real node and from `python -m http.server`."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from forge_cli import identity
from forge_cli.errors import EntryRejected, UsageError
from forge_cli.ledger import note, tiles
from forge_cli.ledger.entries import MAX_LEAF_BYTES
from forge_cli.ledger.store import Draft, Ledger
from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess

VERIFIER = REPO / "tests" / "tlog_verify.py"
GO_VERIFIER = REPO / "tests" / "tlog_verify_go"
GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put Go sources
OLD_SIZES = (300, 700)
SIZE = 1000


def verifier_path() -> str:
    """PYTHONPATH under which `tlog_scales` imports; skips the test when it is not installed."""
    extra = os.environ.get("FORGE_TLOG_SCALES_PATH", "")
    if extra and (Path(extra) / "tlog_scales").is_dir():
        return extra
    if importlib.util.find_spec("tlog_scales") is not None:
        return ""
    pytest.skip("the independent verifier tlog-scales is not installed "
                "(`pip install tlog-scales`, part of the test extras; or set "
                "FORGE_TLOG_SCALES_PATH to a folder it was installed into with --target)")


def run_verifier(location: str, vkey: str, *args: str) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env["PYTHONPATH"] = verifier_path()  # forge itself is not importable there
    done = subprocess.run([sys.executable, str(VERIFIER), location, vkey, *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="session")
def go_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/tlog_verify_go built against Debian's golang.org/x/mod (offline, GOPATH mode)."""
    go = shutil.which("go")
    if go is None or not (GOPATH / "src/golang.org/x/mod/sumdb/tlog").is_dir():
        pytest.skip("the Go checksum-database verifier needs Debian's golang-go and "
                    "golang-golang-x-mod-dev (`apt-get install golang-go "
                    "golang-golang-x-mod-dev`)")
    out = tmp_path_factory.mktemp("go") / "tlog_verify_go"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH), "GOFLAGS": "",
           "GOCACHE": str(out.parent / "cache"), "GOPROXY": "off"}
    done = subprocess.run([go, "build", "-o", str(out), "."], cwd=GO_VERIFIER, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def run_go_verifier(binary: Path, location: str, vkey: str, *olds: Path) -> tuple[int, dict]:
    done = subprocess.run([str(binary), location, vkey, *map(str, olds)], capture_output=True,
                          text=True, timeout=300)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout.splitlines()[-1])


# -- paths -----------------------------------------------------------------------------------


def test_tile_paths_follow_the_spec_examples() -> None:
    assert Tile(0, 1234067).path() == "tile/0/x001/x234/067"
    assert Tile(2, 5, 17).path() == "tile/2/005.p/17"
    assert Tile(0, 0, entries=True).path() == "tile/entries/000"
    for path in ("0/x001/x234/067", "63/000", "entries/x001/000.p/255", "1/999.p/1"):
        assert parse(path).path() == "tile/" + path


def test_a_tree_of_70000_has_the_tiles_the_spec_lists() -> None:
    found = list(tiles.tiles_for_size(70_000))
    full = [t for t in found if t.full and not t.entries]
    partial = {(t.level, t.index, t.width) for t in found if not t.full and not t.entries}
    assert len([t for t in full if t.level == 0]) == 273
    assert [(t.level, t.index) for t in full if t.level > 0] == [(1, 0)]
    assert partial == {(0, 273, 112), (1, 1, 17), (2, 0, 1)}
    assert {(t.index, t.width) for t in found if t.entries and not t.full} == {(273, 112)}
    assert {(t.level, t.width) for t in tiles.tiles_for_size(256)} == {(0, 256), (1, 1)}
    assert list(tiles.tiles_for_size(0)) == []


@pytest.mark.parametrize("path", [
    "0", "entries", "", "00/000", "064/000", "64/000", "-1/000", "1.0/000", "0/1", "0/0001",
    "0/x000/001", "0/x01/001", "0/001/002", "0/y001/002", "0/x001", "0/001.p/0", "0/001.p/256",
    "0/001.p/007", "0/001.p/", "0/001.p/5/6", "0/../000", "0/\u0661\u0662\u0663",
    "0/" + "x999/" * 9 + "999", "entries/abc", "0/001.P/5",
])
def test_tile_path_parser_refuses_every_non_canonical_spelling(path: str) -> None:
    with pytest.raises(UsageError):
        tiles.parse_path(path)


def parse(path: str) -> Tile:
    return tiles.parse_path(path)


Tile = tiles.Tile


# -- the leaf bound --------------------------------------------------------------------------


def test_an_entry_over_65535_bytes_is_refused_at_append_and_nothing_is_written(
        tmp_path: Path) -> None:
    me = identity.Identity.generate()
    with Ledger.open_writer(tmp_path / "l.db", me) as book:
        book.append("note", {"text": "small"})
        with pytest.raises(EntryRejected, match="at most 65,535 bytes"):
            book.append("note", {"text": "x" * MAX_LEAF_BYTES})
        with pytest.raises(EntryRejected, match="65,535"):
            book.append_many([Draft("note", {"text": "ok"}), Draft("note", {"text": "y" * 70_000})])
        assert book.size == 1
        # The largest entry that fits is accepted and served whole in its bundle.
        overhead = len(book.entry(0).raw) - len("small")
        fits = book.append("note", {"text": "z" * (MAX_LEAF_BYTES - overhead - 10)})
        assert len(fits.raw) <= MAX_LEAF_BYTES
        book.checkpoint()
        data = tiles.read(book, Tile(0, 0, 2, entries=True))
        assert data is not None and int.from_bytes(data[-len(fits.raw) - 2:][:2]) == len(fits.raw)


def test_an_imported_entry_over_the_bound_is_refused(tmp_path: Path) -> None:
    me = identity.Identity.generate()
    with Ledger.open_writer(tmp_path / "l.db", me) as book:
        fields = {"seq": 0}
        with pytest.raises(EntryRejected, match="65,535"):
            book.commit_signed([(fields, b"{" * 65_536, b"\0" * 32, b"\0" * 64, {})])
        assert book.size == 0


# -- a node and a static server, checked by the independent verifier ------------------------


def seed_ledger(home: Path) -> tuple[str, list[Path]]:
    """SIZE notes in the node's own ledger, with checkpoints at OLD_SIZES saved to files;
    returns the log's verifier key and those files."""
    me = identity.load_or_create(home / "node.key")
    saved = []
    with Ledger.open_writer(home / "ledger.db", me) as book:
        done = 0
        for stop in (*OLD_SIZES, SIZE):
            book.append_many([Draft("note", {"text": f"entry {i}"}) for i in range(done, stop)])
            done = stop
            if stop in OLD_SIZES:
                saved.append(home / f"checkpoint-{stop}.txt")
                saved[-1].write_text(book.checkpoint(), encoding="utf-8")
    return note.Verifier(note.origin_for(me.node_id), me.public_key).vkey(), saved


class StaticServer:
    """`python -m http.server` on an ephemeral loopback port, serving `directory`."""

    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
             "--directory", str(directory)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        watchdog = threading.Timer(60, self.proc.kill)
        watchdog.start()
        try:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
        finally:
            watchdog.cancel()
        assert "port" in line, f"http.server did not start: {line!r}"
        self.url = f"http://127.0.0.1:{line.split('port')[1].split()[0]}"

    def __enter__(self) -> StaticServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    home = tmp_path_factory.mktemp("tiles-node")
    vkey, old = seed_ledger(home)
    with NodeProcess(home, tiny_gguf) as node:
        yield node, vkey, old


def test_node_tiles_over_http_verify_in_tlog_scales(served) -> None:
    node, vkey, old = served
    status, head, text = node.request("GET", "/ledger/checkpoint")  # no token: the log is public
    assert status == 200, text
    assert head["Content-Type"] == "text/plain; charset=utf-8"
    assert head["Cache-Control"] == "public, max-age=2"
    assert int(text.split("\n")[1]) >= SIZE
    args = [a for path in old for a in ("--old-checkpoint", str(path))]
    code, result = run_verifier(node.url + "/ledger", vkey, *args)
    assert code == 0, result
    assert result["entries_checked"] >= SIZE
    assert result["old_sizes_consistent"] == list(OLD_SIZES)


def test_exported_tiles_served_by_http_server_verify_and_match_the_node(
        served, tmp_path: Path) -> None:
    node, vkey, old = served
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "tiles", "export",
                           str(site), "--json"], capture_output=True, text=True, cwd=REPO,
                          env=forge_env(node.home), timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["size"] >= SIZE and report["files"] > 10
    checkpoint = (site / "checkpoint").read_text(encoding="utf-8")
    args = [a for path in old for a in ("--old-checkpoint", str(path))]
    with StaticServer(site) as static:
        code, result = run_verifier(static.url, vkey, *args)
        assert code == 0, result
        assert result["size"] == report["size"] and result["old_sizes_consistent"] == list(OLD_SIZES)
    code, result = run_verifier(str(site), vkey)  # and straight from the folder
    assert code == 0, result
    # Byte for byte what the node serves.
    assert checkpoint.split("\n")[1] == str(report["size"])
    for rel in ("tile/0/000", "tile/entries/001", "tile/1/000.p/3", "tile/entries/002.p/188"):
        status, _, _ = node.request("GET", "/ledger/" + rel)
        assert status == 200, rel
        assert fetch(node.url + "/ledger/" + rel) == (site / rel).read_bytes(), rel


def fetch(url: str, headers: dict[str, str] | None = None) -> bytes:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                timeout=60) as response:
        return response.read()


def test_a_tampered_export_fails_the_verifier(served, tmp_path: Path) -> None:
    """The check can fail: one flipped byte in an entry bundle, or a tile, is caught."""
    node, vkey, _ = served
    with Ledger.open_reader(node.home / "ledger.db") as book:
        tiles.export(book, tmp_path / "site")
    for rel, offset in (("tile/entries/001", 40), ("tile/0/000", 100)):
        target = tmp_path / "site" / rel
        original = target.read_bytes()
        target.write_bytes(original[:offset] + bytes([original[offset] ^ 1]) + original[offset + 1:])
        code, result = run_verifier(str(tmp_path / "site"), vkey)
        assert code == 1 and not result["ok"], rel
        target.write_bytes(original)
    other = identity.Identity.generate()
    wrong = note.Verifier(vkey.split("+")[0], other.public_key).vkey()
    code, result = run_verifier(str(tmp_path / "site"), wrong)
    assert code == 1


def export_with_cli(home: Path, site: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "tiles", "export",
                           str(site), "--json"], capture_output=True, text=True, cwd=REPO,
                          env=forge_env(home), timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_node_and_exported_tiles_verify_in_go_x_mod(served, go_verifier: Path,
                                                     tmp_path: Path) -> None:
    """The same checks by golang.org/x/mod/sumdb/tlog and sumdb/note (the Go checksum
    database's code, from Debian): over HTTP from the node, and from http.server."""
    node, vkey, old = served
    code, result = run_go_verifier(go_verifier, node.url + "/ledger", vkey, *old)
    assert code == 0, result
    assert result["size"] >= SIZE and result["old_sizes_consistent"] == list(OLD_SIZES)
    report = export_with_cli(node.home, tmp_path / "site")
    with StaticServer(tmp_path / "site") as static:
        code, result = run_go_verifier(go_verifier, static.url, vkey, *old)
    assert code == 0, result
    assert result["size"] == report["size"]
    target = tmp_path / "site" / "tile" / "entries" / "000"
    original = target.read_bytes()
    target.write_bytes(original[:50] + bytes([original[50] ^ 1]) + original[51:])
    code, result = run_go_verifier(go_verifier, str(tmp_path / "site"), vkey)
    assert code == 1 and "does not hash to its leaf" in result["error"], result


def test_tile_routes_answer_hostile_paths_with_400_and_missing_tiles_with_404(served) -> None:
    node, _, _ = served
    for bad in ("0/1", "64/000", "0/x000/001", "0/000.p/0", "0/000.p/256", "entries/000.p/07",
                "0/%2e%2e/000", "0/" + "x001/" * 12 + "001"):
        status, head, body = node.request("GET", "/ledger/tile/" + bad)
        assert status == 400, (bad, body)
        assert body["error"]["type"] == "invalid_request_error", body
    # Past the end of the tree, and a partial width no checkpoint names.
    for missing in ("0/x001/000", "entries/010", "0/003.p/5", "1/000.p/9", "2/000.p/1"):
        status, head, body = node.request("GET", "/ledger/tile/" + missing)
        assert status == 404, (missing, body)
        assert head["Cache-Control"] == "no-store"
    status, head, _ = node.request("GET", "/ledger/tile/0/000")
    assert status == 200
    assert head["Cache-Control"] == "public, max-age=31536000, immutable"
    assert head["Content-Type"] == "application/octet-stream"
    status, head, _ = node.request("GET", "/ledger/tile/0/001.p/44")
    assert status == 200 and head["Cache-Control"] == "public, max-age=86400"
    plain = fetch(node.url + "/ledger/tile/entries/000", {"Accept-Encoding": "identity"})
    zipped = fetch(node.url + "/ledger/tile/entries/000", {"Accept-Encoding": "gzip"})
    assert gzip.decompress(zipped) == plain and len(zipped) < len(plain)
    assert len(fetch(node.url + "/ledger/tile/0/000")) == 8192


def test_tiles_bench_names_its_options_and_refuses_bad_counts() -> None:
    bench = REPO / "bench" / "tiles_bench.py"
    done = subprocess.run([sys.executable, str(bench), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--entries", "--readers", "--rounds", "--json"):
        assert option in done.stdout
    done = subprocess.run([sys.executable, str(bench), "--readers", "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "must be at least 1" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_cosigned_checkpoint_verifies_in_tlog_scales(tmp_path: Path) -> None:
    """forge's tlog-cosignature/v1 lines check out in the same independent verifier (how a
    witness's cosignature is checked: `tests/tlog_verify.py … --cosigner VKEY`)."""
    me, witness_key = identity.Identity.generate(), identity.Identity.generate()
    with Ledger.open_writer(tmp_path / "l.db", me) as book:
        book.append_many([Draft("note", {"text": f"e{i}"}) for i in range(300)])
        book.checkpoint()
        tiles.export(book, tmp_path / "site")
    vkey = note.Verifier(note.origin_for(me.node_id), me.public_key).vkey()
    name = note.origin_for(witness_key.node_id) + "/witness"
    cosigner = note.Verifier(name, witness_key.public_key, note.COSIGNATURE_V1).vkey()
    signed = (tmp_path / "site" / "checkpoint").read_text(encoding="utf-8")
    (tmp_path / "site" / "checkpoint").write_text(
        note.cosign(signed, name, witness_key, 1_760_000_000), encoding="utf-8")
    code, result = run_verifier(str(tmp_path / "site"), vkey, "--cosigner", cosigner)
    assert code == 0 and result["cosignatures"] == 1, result
    stranger = identity.Identity.generate()
    wrong = note.Verifier(name, stranger.public_key, note.COSIGNATURE_V1).vkey()
    code, result = run_verifier(str(tmp_path / "site"), vkey, "--cosigner", wrong)
    assert code == 1 and "0 of 1 cosignatures" in result["error"], result


def test_export_without_a_checkpoint_or_to_an_unwritable_place_exits_2_with_a_reason(
        tmp_path: Path) -> None:
    me = identity.Identity.generate()
    with Ledger.open_writer(tmp_path / "l.db", me) as book:
        book.append("note", {"text": "no checkpoint yet"})
    run = [sys.executable, "-m", "forge_cli", "ledger", "tiles", "export"]
    done = subprocess.run([*run, str(tmp_path / "site"), "--ledger", str(tmp_path / "l.db")],
                          capture_output=True, text=True, cwd=REPO, env=forge_env(tmp_path),
                          timeout=120)
    assert done.returncode == 2 and "no signed checkpoint" in done.stderr, done.stderr
    assert "forge ledger checkpoint" in done.stderr and "Traceback" not in done.stderr
    with Ledger.open_writer(tmp_path / "l.db", me) as book:
        book.checkpoint()
    (tmp_path / "file").write_text("in the way")
    done = subprocess.run([*run, str(tmp_path / "file" / "site"), "--ledger",
                           str(tmp_path / "l.db")], capture_output=True, text=True, cwd=REPO,
                          env=forge_env(tmp_path), timeout=120)
    assert done.returncode == 2 and "cannot write" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
