"""The README read as the tests replay it (``test_readme_walkthrough``, ``test_compose``): its
shell blocks' grpcurl commands and its ``##`` sections."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def shell_blocks() -> list[list[list[str]]]:
    """The README's ```sh blocks, each as a list of grpcurl argument lists."""
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
        commands = []
        pending = ""
        for line in body.replace("\\\n", " ").splitlines():
            pending += line + "\n"
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quote spans lines: read on
                continue
            pending = ""
            if words[:1] == ["grpcurl"]:
                commands.append(words[1:])
        blocks.append(commands)
    return blocks


def section(title: str) -> str:
    """One ``## title`` section of the README."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]
