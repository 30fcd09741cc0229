"""Regenerates the Python stubs of the wire contract: ``python -m tools.protogen [--check]``.

The generated modules live in ``shared/gen`` and are committed; nobody edits them. protoc writes
imports as ``automation.v1``; they are rewritten to ``shared.gen.automation.v1`` so the stubs are
an ordinary subpackage (only import lines and module names are touched, never the serialized
descriptors). ``--check`` regenerates into a temporary directory and fails when the committed
files differ, which is how CI catches stale stubs.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "shared" / "gen"
_PREFIX = "shared.gen."

# Our packages: automation.v1, and io.cloudevents.v1 (the CloudEvents Protobuf Format), whose
# top-level name would otherwise be the standard library's io.
_PACKAGES = r"(automation\.v1|io\.cloudevents\.v1)"
_PY_IMPORT = re.compile(rf"^from {_PACKAGES} import ", re.MULTILINE)
_PY_MODULE_NAME = re.compile(rf"'{_PACKAGES}\.(\w+_pb2)'")
_PYI_NAME = re.compile(rf"(?<![\w./]){_PACKAGES}\.(\w+_pb2(?:_grpc)?)\b")


def _rewrite(path: Path) -> None:
    text = path.read_text()
    if path.suffix == ".pyi":
        text = _PYI_NAME.sub(rf"{_PREFIX}\1.\2", text)
        text = _PY_IMPORT.sub(rf"from {_PREFIX}\1 import ", text)
    else:
        text = _PY_IMPORT.sub(rf"from {_PREFIX}\1 import ", text)
        text = _PY_MODULE_NAME.sub(rf"'{_PREFIX}\1.\2'", text)
    path.write_text(text)


def generate(out: Path) -> None:
    """Runs protoc (with the grpc and mypy plugins) over every .proto into ``out``."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    wkt = Path(protoc.__file__).parent / "_proto"
    # The mypy plugins are installed beside this interpreter; the venv's bin/ need not be
    # on PATH (./dev runs .venv/bin/python without activating the venv).
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:  # type: ignore[no-untyped-call]
        raise SystemExit("protoc failed")
    for package_dir in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (package_dir / "__init__.py").touch()
    for path in out.rglob("*"):
        if path.suffix in {".py", ".pyi"} and path.name != "__init__.py":
            _rewrite(path)
    (out / "__init__.py").write_text('"""Generated from protos/ by `python -m tools.protogen`. Do not edit."""\n')


def _differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    found = [f"only in {a}: {n}" for n in cmp.left_only] + [f"only in {b}: {n}" for n in cmp.right_only]
    found += [f"differs: {a / n}" for n in cmp.diff_files]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    found += [f"differs: {a / n}" for n in mismatch + errors if f"differs: {a / n}" not in found]
    for sub in cmp.common_dirs:
        found += _differences(a / sub, b / sub)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if shared/gen is stale")
    ns = parser.parse_args()
    if not ns.check:
        if OUT.exists():
            shutil.rmtree(OUT)
        generate(OUT)
        print(f"generated {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh)
        diffs = _differences(fresh, OUT) if OUT.exists() else [f"{OUT} is missing"]
    if diffs:
        print("generated code is stale; run `python -m tools.protogen`:", *diffs, sep="\n  ", file=sys.stderr)
        return 1
    print("generated code is fresh")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
