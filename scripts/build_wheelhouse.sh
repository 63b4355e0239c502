#!/usr/bin/env bash
# Build wheelhouse/: wheels of everything flashmorph needs that a GPU image with torch and transformers lacks,
# for one target Python version, so that a node without internet installs with scripts/install_wheelhouse.sh.
# Run it where the package registry is reachable (any OS/CPU: every wheel is fetched for the target platform).
#
#   scripts/build_wheelhouse.sh [--python-version 3.12] [--dest wheelhouse] [--platform TAG]... [--extra SPEC]...
#
# deepspeed has no wheel on the registry: it is built here from its sdist with DS_BUILD_OPS=0 (no CUDA ops
# compiled, a pure-python wheel; flashmorph needs none of its ops). Everything is fetched with --no-deps: the list
# below is the set that proved enough on a GPU image that has torch, transformers, numpy, pyarrow, fsspec, einops,
# psutil, ... (README, "Offline install"); add what another image lacks with --extra 'name==ver'.
set -euo pipefail

PYTHON=${PYTHON:-python3}
PY_VERSION=3.12
DEST=wheelhouse
PLATFORMS=()
EXTRA=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) PY_VERSION=$2; shift 2 ;;
        --dest) DEST=$2; shift 2 ;;
        --platform) PLATFORMS+=("$2"); shift 2 ;;
        --extra) EXTRA+=("$2"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ $PY_VERSION =~ ^3\.[0-9]+$ ]]; then
    echo "error: --python-version $PY_VERSION must look like 3.12" >&2; exit 2
fi
if [[ ${#PLATFORMS[@]} -eq 0 ]]; then
    # pip matches manylinux_2_N exactly, so name every glibc level a wheel may be tagged with
    PLATFORMS=(manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64
               manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
               manylinux2014_x86_64 manylinux1_x86_64)
fi

# Versions tested together (py3.11 on the CPU box, py3.12 on the GPU node). megatron-core is a range: its newest
# release with py3.11 wheels is 0.16.x, py3.12 gets 0.19.x; both serve flashmorph's tensor-parallel layers.
DEEPSPEED="deepspeed==0.19.8"
PACKAGES=(
    "megatron-core>=0.16,<0.20"
    "fla-core==0.6.0"
    "flash-linear-attention==0.6.0"
    "datasets==5.2.0"
    "peft==0.21.2"
    "dill==0.4.1"                 # datasets
    "multiprocess==0.70.19"       # datasets
    "hjson==3.1.0"                # deepspeed
    "pydantic==2.13.4"            # deepspeed
    "pydantic-core==2.46.4"       # pydantic pins its core exactly
    "annotated-types==0.7.0"      # pydantic
    "typing-inspection==0.4.2"    # pydantic
    "typing-extensions==4.16.0"   # pydantic
)
PACKAGES+=("${EXTRA[@]+"${EXTRA[@]}"}")

mkdir -p "$DEST"
echo "== building $DEEPSPEED from source with DS_BUILD_OPS=0"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps --no-cache-dir --no-binary deepspeed -w "$DEST" "$DEEPSPEED"
if ! ls "$DEST"/deepspeed-*-py3-none-any.whl >/dev/null 2>&1; then
    echo "error: the deepspeed build did not give a pure-python wheel; check that DS_BUILD_OPS=0 reached setup.py" >&2
    exit 1
fi

echo "== downloading ${#PACKAGES[@]} packages for CPython $PY_VERSION"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PYTHON" -m pip download --no-deps --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
    "${platform_args[@]}" -d "$DEST" "${PACKAGES[@]}"

# install_wheelhouse.sh installs exactly these requirements, so a wheelhouse that holds wheels of several Python
# versions still installs the one that fits the interpreter
printf '%s\n' "$DEEPSPEED" "${PACKAGES[@]}" > "$DEST/requirements.txt"
echo "== wheelhouse $DEST for CPython $PY_VERSION:"
ls -1 "$DEST"
du -sh "$DEST"
