#!/usr/bin/env bash
# Set up edgeft in ./.venv: llama-cpp-python built once per (version, preset) and cached in a
# wheelhouse, edgeft installed editable with every extra the tests need, default base pulled.
#   ./setup.sh [--preset cpu|cpu-native|metal|cuda|vulkan] [--no-pull]
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)

preset="${EDGEFT_PRESET:-cpu}"
pull=1
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --preset=*) preset="${1#*=}"; shift ;;
    --no-pull) pull=0; shift ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done

args_file="cmake/presets/$preset.args"
if [ ! -f "$args_file" ]; then
  echo "setup.sh: no preset '$preset'; choose one of: $(ls cmake/presets | sed 's/\.args$//' | tr '\n' ' ')" >&2
  exit 1
fi

py="${PYTHON:-python3}"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "setup.sh: Python 3.10+ needed" >&2; exit 1; }
[ -x .venv/bin/python ] || "$py" -m venv .venv
vpy=.venv/bin/python
"$vpy" -m pip install -q --upgrade pip

# The llama-cpp-python pin lives in pyproject.toml only.
lcp_version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)
cmake_args=$(grep -v '^\s*#' "$args_file" | grep -v '^\s*$' | tr '\n' ' ' | sed 's/ *$//')
# Patches applied to the vendored llama.cpp before the build (cmake/patches/README.md); they are
# part of the wheel's cache key, like the flags.
patches=$(ls cmake/patches/llama.cpp/*.patch 2>/dev/null | sort || true)
patch_sum=$( (for p in $patches; do cat "$p"; done) | sha256sum | cut -c1-12)
key=$(printf '%s|%s' "$cmake_args" "$patch_sum" | sha256sum | cut -c1-12)

wheel_dir="${EDGEFT_WHEELHOUSE:-$HOME/.cache/edgeft/wheels}/llama-cpp-python/$lcp_version/$preset-$key"
wheel=$(ls "$wheel_dir"/llama_cpp_python-"$lcp_version"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "setup.sh: building llama-cpp-python $lcp_version, preset '$preset' (several minutes, once)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$vpy" -m pip download -q --no-deps --no-binary :all: --disable-pip-version-check \
    "llama-cpp-python==$lcp_version" -d "$tmp/sdist"
  tar xzf "$(ls "$tmp"/sdist/*.tar.gz | head -1)" -C "$tmp"
  src=$(ls -d "$tmp"/llama*cpp*python-"$lcp_version" | head -1)
  # A patch that does not apply (a newer sdist) leaves llama.cpp stock: the runtime detects the
  # patch level and runs without the patched paths (`edgeft doctor` shows it), so build anyway.
  for p in $patches; do
    if (cd "$src" && git apply --check --directory=vendor/llama.cpp -p1 "$root/$p" 2>/dev/null); then
      echo "setup.sh: applying $p"
      (cd "$src" && git apply --directory=vendor/llama.cpp -p1 "$root/$p")
    else
      echo "setup.sh: $p does not apply to llama-cpp-python $lcp_version; building without it (stock llama.cpp for that part)" >&2
    fi
  done
  CMAKE_ARGS="$cmake_args" "$vpy" -m pip wheel --no-deps --no-cache-dir "$src" -w "$tmp/wheel"
  mkdir -p "$wheel_dir"
  built=$(ls "$tmp"/wheel/*.whl)
  mv "$built" "$wheel_dir/.partial.whl" && mv "$wheel_dir/.partial.whl" "$wheel_dir/$(basename "$built")"
  wheel="$wheel_dir/$(basename "$built")"
fi
echo "setup.sh: llama-cpp-python from $wheel"
"$vpy" -m pip install -q "$wheel"  # with its dependencies
# the same version built with other flags or patches must replace an installed one
"$vpy" -m pip install -q --force-reinstall --no-deps "$wheel"
# torch pinned here, not in the extras: an unpinned torch may resolve to a multi-GB CUDA build.
"$vpy" -m pip install -q "torch==${EDGEFT_TORCH_VERSION:-2.13.0}"
"$vpy" -m pip install -q -e ".[all]"

if [ "$pull" = 1 ]; then
  .venv/bin/edgeft pull
fi
echo "setup.sh: ready. Try: .venv/bin/edgeft run \"What is the capital of France?\""
