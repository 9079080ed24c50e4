"""Write the tiny reference checkpoints and outputs under tests/fixtures/ (committed).

Runs once, in a separate environment with PyTorch and the reference libraries; the test suite
itself never needs torch:

    python3.11 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 transformers diffusers tokenizers sentencepiece \
        safetensors protobuf
    /tmp/refenv/bin/python tools/make_reference_fixtures.py            # every family
    /tmp/refenv/bin/python tools/make_reference_fixtures.py t5 wan     # or some of them

Each family lives in tools/fixtures/<name>.py with `make(out: Path) -> None`, writing into
tests/fixtures/<name>/: randomly initialised tiny models in their library's own layout
(`save_pretrained(..., safe_serialization=True)`), inputs, and the reference outputs as
safetensors. Seeds are fixed, so a rerun rewrites the same files.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
FIXTURES = TOOLS.parent / "tests" / "fixtures"


def families() -> list[str]:
    return sorted(p.stem for p in (TOOLS / "fixtures").glob("*.py") if not p.stem.startswith("_"))


def run(name: str) -> None:
    path = TOOLS / "fixtures" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fixtures_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    module.make(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{name}: wrote {out} ({size / 1024:.0f} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"families to write (default: all of "
                                                 f"{', '.join(families())})")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(families()))
    if unknown:
        parser.error(f"unknown fixture families {unknown}; choose from {families()}")
    for name in args.names or families():
        run(name)


if __name__ == "__main__":
    main()
