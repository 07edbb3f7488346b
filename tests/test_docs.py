"""Completions and the man page: current with the command tree, and usable."""

from __future__ import annotations

import shutil
import subprocess

from forge_cli.cli import docs
from tests.conftest import REPO


def test_checked_in_completions_and_man_page_match_a_fresh_generation():
    for rel, text in docs.generate().items():
        current = (REPO / rel).read_text(encoding="utf-8")
        assert current == text, f"{rel} is stale: run `python -m forge_cli.cli.docs` (make docs)"


def test_docs_check_flag_names_a_stale_file(tmp_path, monkeypatch):
    for rel, text in docs.generate().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    monkeypatch.setattr(docs, "REPO", tmp_path)
    assert docs.main(["--check"]) == 0
    (tmp_path / "man/forge.1").write_text("stale\n", encoding="utf-8")
    assert docs.main(["--check"]) == 1
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0


def _bash_complete(line: str) -> list[str]:
    script = (
        f"source {REPO / 'completions/forge.bash'}\n"
        f"read -ra W <<< {line!r}\n"
        + ('W+=("")\n' if line.endswith(" ") else "")
        + 'COMP_WORDS=("${W[@]}"); COMP_CWORD=$((${#W[@]}-1)); COMPREPLY=(); _forge\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
        "complete -p forge\n"
    )
    done = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completion_completes_subcommands_options_and_choices():
    tree = docs.command_tree()
    top = [c.path[-1] for c in tree.children]
    assert "tui" in top and "ledger" in top
    assert set(top) <= set(_bash_complete("forge "))
    assert _bash_complete("forge led")[:1] == ["ledger"]
    ledger_subs = _bash_complete("forge ledger ")
    assert "verify" in ledger_subs and "prove" in ledger_subs
    assert {"--json", "--deep"} <= set(_bash_complete("forge ledger verify --"))
    assert {"--node", "--token"} <= set(_bash_complete("forge tui --"))
    # a value after an option is not mistaken for a subcommand
    assert "--poll" in _bash_complete("forge tui --node ledger --")


def test_zsh_and_fish_completions_name_every_command_and_option():
    tree = docs.command_tree()
    zsh = (REPO / "completions/forge.zsh").read_text()
    fish = (REPO / "completions/forge.fish").read_text()
    assert zsh.startswith("#compdef forge") and "compdef _forge forge" in zsh
    for cmd in tree.walk():
        assert f"'{cmd.name}')" in zsh
        assert f"__forge_at \\'{cmd.name}\\'" in fish
        for opt in cmd.options:
            for name in opt.long:
                assert f"'{name}:" in zsh
                assert f"-l {name[2:]}" in fish


def test_man_page_documents_every_command_option_exit_code_file_and_variable():
    page = (REPO / "man/forge.1").read_text()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS",
                    "ENVIRONMENT", "FILES"):
        assert f".SH {section}\n" in page
    for cmd in docs.command_tree().walk():
        if len(cmd.path) > 1:
            assert f'.SS "{docs.roff(cmd.name)}"' in page
        for opt in cmd.options:
            for name in opt.long:
                assert docs.roff(name) in page
    for needle in ("FORGE_HOME", "FORGE_TOKEN", "FORGE_NODE", "api_token", "ledger.db"):
        assert needle in page


def test_man_page_renders_without_warnings():
    groff = shutil.which("groff")
    if groff is not None:
        done = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(REPO / "man/forge.1")],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stderr == "", done.stderr
    man = shutil.which("man")
    if man is not None:
        done = subprocess.run([man, "-l", str(REPO / "man/forge.1")], capture_output=True, text=True,
                              timeout=30, env={"PATH": "/usr/bin:/bin", "MANPAGER": "cat", "PAGER": "cat",
                                               "MANWIDTH": "80"})
        assert done.returncode == 0, done.stderr
        assert "forge ledger verify" in done.stdout and "EXIT STATUS" in done.stdout
    page = (REPO / "man/forge.1").read_text()
    assert page.splitlines()[1].startswith(".TH FORGE 1 ")
