"""Running ``python -m tools.chaos`` as a person would, and reading its tables: shared by the
chaos tests."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def run_chaos(
    log_dir: Path, *args: str, timeout: float = 500
) -> tuple[str, dict[str, str], dict[str, list[str]]]:
    """Runs the harness (on its own PostgreSQL: DATABASE_URL is dropped) and asserts it passed;
    its output, the main table's rows and the per-kind table's rows."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.chaos",
        "--log-dir",
        str(log_dir),
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = out.decode(errors="replace")
    assert proc.returncode == 0, output[-8000:]
    assert "RESULT: PASS" in output, output[-8000:]
    rows: dict[str, str] = {}
    kinds: dict[str, list[str]] = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if re.match(r"^\| [a-z_]+ +\| \d+ +\|", line):
            kinds[cells[0]] = cells[1:]
        elif m := re.match(r"^\| (.+?) +\| (.*)$", line):
            rows[m.group(1)] = m.group(2).strip()
    return output, rows, kinds


def first_int(value: str) -> int:
    m = re.match(r"\d+", value)
    assert m, f"no number in {value!r}"
    return int(m.group())
