#!/usr/bin/env bash
# Install flashmorph's dependencies from a wheelhouse made by scripts/build_wheelhouse.sh, with no network,
# into the current Python environment or into --target DIR; then import each package and flashmorph.
#
#   scripts/install_wheelhouse.sh [--wheelhouse wheelhouse] [--target DIR]
#
# flashmorph itself runs from this checkout (the check puts the repository root on PYTHONPATH); with a target,
# use it as:  export PYTHONPATH=DIR:$PWD:$PYTHONPATH
set -euo pipefail

PYTHON=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=${PIP_ROOT_USER_ACTION:-ignore}  # containers run as root; older pips ignore it
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELHOUSE=$ROOT/wheelhouse
TARGET=

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheelhouse) WHEELHOUSE=$2; shift 2 ;;
        --target) TARGET=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
REQUIREMENTS=$WHEELHOUSE/requirements.txt
if [[ ! -f $REQUIREMENTS ]]; then
    echo "error: $REQUIREMENTS not found; build the wheelhouse first with scripts/build_wheelhouse.sh" >&2
    exit 1
fi

# --no-deps: the wheelhouse holds exactly the missing packages, the image provides the rest; the import check
# below is what tells whether anything is still missing
args=(--no-index --no-deps --no-cache-dir --find-links "$WHEELHOUSE" -r "$REQUIREMENTS")
if [[ -n $TARGET ]]; then
    mkdir -p "$TARGET"
    TARGET=$(cd "$TARGET" && pwd)
    "$PYTHON" -m pip install -q --no-compile --upgrade --target "$TARGET" "${args[@]}"
    export PYTHONPATH=$TARGET:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
    "$PYTHON" -m pip install -q "${args[@]}"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== import check ($("$PYTHON" --version 2>&1))"
"$PYTHON" - <<'EOF'
import importlib
import importlib.metadata
import sys
import warnings

warnings.filterwarnings("ignore")  # fla warns at import where triton finds no GPU
modules = {  # module -> distribution, whose version is printed
    "deepspeed": "deepspeed", "megatron.core": "megatron-core", "fla": "flash-linear-attention",
    "datasets": "datasets", "peft": "peft", "pydantic": "pydantic", "hjson": "hjson", "dill": "dill",
    "multiprocess": "multiprocess", "torch": "torch", "transformers": "transformers",
    "flashmorph": None, "flashmorph.model.morph": None, "flashmorph.parallel.zero": None,
}
failed = []
for module, dist in modules.items():
    try:
        loaded = importlib.import_module(module)
    except Exception as err:  # any failure is a missing or broken package: list them all, then fail
        failed.append(module)
        print(f"  FAIL {module}: {type(err).__name__}: {err}")
        continue
    version = importlib.metadata.version(dist) if dist else ""
    print(f"  ok   {module} {version}  ({getattr(loaded, '__file__', '') or 'namespace'})")
if failed:
    sys.exit(f"import check failed for {failed}; add the missing packages with build_wheelhouse.sh --extra")
EOF
if [[ -n $TARGET ]]; then
    echo "installed into $TARGET; use it with:  export PYTHONPATH=$TARGET:$ROOT\${PYTHONPATH:+:\$PYTHONPATH}"
fi
