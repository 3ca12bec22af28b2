#!/bin/sh
# Build a throwaway venv with kvpress for the peer comparison of `rocketkv bench`:
#
#     sh benchmarks/kvpress_venv.sh [DEST]          # default DEST: /tmp/kvpress-venv
#     python benchmarks/decode.py --kvpress-python /tmp/kvpress-venv/bin/python
#     python benchmarks/kvpress_ruler.py --kvpress-python /tmp/kvpress-venv/bin/python
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
# kernels: the project's (0.19 with transformers 5.25) would be seen through the .pth, and
# transformers 5.2 fails at import with it ("Either a revision or a version must be
# specified"); install the range transformers 5.2 declares for its kernels extra.
"$DEST/bin/pip" install --quiet kvpress==0.5.5 "kernels>=0.10.2,<0.11"
"$DEST/bin/python" -c 'import kvpress, transformers, torch; from importlib.metadata import version; print("kvpress", version("kvpress"), "transformers", transformers.__version__, "torch", torch.__version__)'
echo "use: --kvpress-python $DEST/bin/python"
