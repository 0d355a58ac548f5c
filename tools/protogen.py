"""Generate the Python code for proto/ and lay out the imported protos for buf.

Usage:
    python tools/protogen.py generate [OUT_DIR]     # default: src/
    python tools/protogen.py vendor [DEST_DIR]      # default: third_party/

The google/api protos come from the googleapis-common-protos wheel and
google/protobuf from grpcio-tools, so nothing is fetched from the Buf
registry (which is unreachable from the build machines).
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GOOGLE_API_PROTOS = ("annotations.proto", "http.proto", "field_behavior.proto")


def _googleapis_root() -> Path:
    import google.api

    return Path(next(iter(google.api.__path__))).parent.parent


def _well_known_root() -> Path:
    return Path(str(resources.files("grpc_tools") / "_proto"))


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{_googleapis_root()}",
        f"-I{_well_known_root()}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_DIR)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def vendor(dest: Path) -> None:
    target = dest / "googleapis" / "google" / "api"
    target.mkdir(parents=True, exist_ok=True)
    for name in GOOGLE_API_PROTOS:
        shutil.copyfile(_googleapis_root() / "google" / "api" / name, target / name)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in {"generate", "vendor"}:
        raise SystemExit(__doc__)
    if argv[1] == "generate":
        generate(Path(argv[2]) if len(argv) > 2 else ROOT / "src")
    else:
        vendor(Path(argv[2]) if len(argv) > 2 else ROOT / "third_party")


if __name__ == "__main__":
    main(sys.argv)
