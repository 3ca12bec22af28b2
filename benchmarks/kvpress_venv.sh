#!/bin/sh
# Build a throwaway venv with kvpress for the peer comparison of `rocketkv bench`:
#
#     sh benchmarks/kvpress_venv.sh [DEST]          # default DEST: /tmp/kvpress-venv
#     python benchmarks/decode.py --kvpress-python /tmp/kvpress-venv/bin/python
#
# kvpress 0.5.5 pins transformers<5.3 while this project uses transformers 5.x >= 5.3, so it
# cannot share our environment. The new venv sees our environment's packages through a .pth
# file placed after its own site-packages: torch and gguf are reused (nothing large is
# downloaded) and kvpress' own transformers takes precedence. Run it with the python of the
# project's environment (or set PYTHON).
set -eu
DEST=${1:-/tmp/kvpress-venv}
PY=${PYTHON:-python}
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
SITE=$("$PY" -c "$purelib")
"$PY" -c 'import torch, gguf' || { echo "run with the project's python (needs torch and gguf: pip install -e '.[test]')" >&2; exit 2; }
"$PY" -m venv "$DEST"
echo "$SITE" > "$("$DEST/bin/python" -c "$purelib")/zz_project_env.pth"
"$DEST/bin/pip" install --quiet kvpress==0.5.5
"$DEST/bin/python" -c 'import kvpress, transformers, torch; from importlib.metadata import version; print("kvpress", version("kvpress"), "transformers", transformers.__version__, "torch", torch.__version__)'
echo "use: --kvpress-python $DEST/bin/python"
