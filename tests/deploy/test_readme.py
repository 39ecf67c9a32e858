"""README's "Run on Nitro" is a sequence whose every command is in the repository.

Each command line of the section's shell blocks is checked: repository scripts exist and are
executable, repository files named as arguments exist, `cloister ...` parses with the real
command-line parser, and anything else is one of the few system tools the section allows.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from cloister.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_TOOLS = {"aws", "git", "openssl", "systemctl", "install", "useradd", "python3.11", "$EDITOR"}
VENV = "/opt/cloister/venv/bin/"  # where the steps install this repository
REPO_PATH = re.compile(r"^(?:eif|deploy|docs|scripts)/[\w./-]+$")


def section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Run on Nitro\n")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def commands() -> list[list[str]]:
    out: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", section(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line:
                continue
            for part in line.split("&&"):
                words = shlex.split(part.replace("<", "_").replace(">", "_").replace("$EDITOR", "EDITOR_"))
                while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
                    words.pop(0)
                out.append(["$EDITOR" if w == "EDITOR_" else w for w in words])
    return out


def test_the_section_exists_and_names_what_was_not_run() -> None:
    text = section()
    assert "Not run where this was written" in text
    for absent in ("docker build", "nitro-cli", "KMS", "CloudFormation"):
        assert absent in text, absent
    assert len(commands()) >= 15


def test_every_command_is_in_the_repository() -> None:
    parser = build_parser()
    for words in commands():
        head = words[0]
        if REPO_PATH.match(head):
            assert os.access(ROOT / head, os.X_OK), f"{head} is not an executable file in the repository"
        elif head in ("cloister", VENV + "cloister"):
            args = [w for w in words[1:] if w != ">"]
            parser.parse_args(args)  # SystemExit on an unknown command or option
        elif head == VENV + "pip":
            assert words[1:3] == ["install", "-c"] and (ROOT / words[3]).is_file() and words[4] == ".", words
        else:
            assert head in SYSTEM_TOOLS, f"{' '.join(words)}: {head} is neither in the repository nor an allowed tool"
        for word in words[1:]:
            if REPO_PATH.match(word) and not word.startswith(("/",)):
                assert (ROOT / word).exists(), f"{' '.join(words)}: {word} does not exist"
