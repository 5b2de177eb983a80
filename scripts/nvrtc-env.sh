#!/usr/bin/env bash
# Installs NVRTC (CUDA's run-time compiler) from PyPI into a Python venv and prints the shell
# lines that make it loadable, so that the CUDA kernels can be compiled to PTX on a machine
# without a GPU or a CUDA toolkit (the PTX test in executor/src/cuda/kernels.rs).
#
#   eval "$(scripts/nvrtc-env.sh)"            # venv in .venv-nvrtc (gitignored)
#   eval "$(scripts/nvrtc-env.sh DIR)"        # venv in DIR
#   eval "$(scripts/nvrtc-env.sh DIR --with-cublas)"   # also cuBLAS, for a GPU machine
#                                                      # without the CUDA libraries
#   eval "$(scripts/nvrtc-env.sh DIR --with-ptxas)"    # also ptxas (nvidia-cuda-nvcc-cu12,
#                                                      # ~95 MB), so the PTX test assembles
#                                                      # the PTX for sm_70/80/90
#
# Packages: nvidia-cuda-nvrtc-cu12 (libnvrtc.so.12, ~90 MB installed) and
# nvidia-cuda-runtime-cu12 (headers such as cuda_fp16.h; the bundled kernels need none, but
# STRATA_NVRTC_INCLUDE points at them for kernels that will). STRATA_NVRTC_VERSION picks the
# NVRTC release (default 12.9.86): on a GPU machine it must be no newer than the driver's CUDA
# version, or the driver rejects the PTX (scripts/gpu-check.sh sets it from nvidia-smi).
# Progress goes to stderr; only the export lines go to stdout. Re-running reuses the venv.
set -euo pipefail

dir="${1:-.venv-nvrtc}"
with_cublas=no with_ptxas=no
for opt in "${@:2}"; do
  case "$opt" in
    --with-cublas) with_cublas=yes ;;
    --with-ptxas) with_ptxas=yes ;;
    *) echo "nvrtc-env: unknown option $opt" >&2; exit 64 ;;
  esac
done
version="${STRATA_NVRTC_VERSION:-12.9.86}"

say() { echo "nvrtc-env: $*" >&2; }

if ! command -v python3 >/dev/null 2>&1; then
  say "python3 not found: cannot install NVRTC from PyPI"
  exit 1
fi
if [ ! -x "$dir/bin/pip" ]; then
  say "creating venv $dir"
  python3 -m venv "$dir" >&2 || { say "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
fi
dir="$(cd "$dir" && pwd)"

find_one() { find "$dir" -name "$1" -print -quit 2>/dev/null; }

have_version="$("$dir/bin/pip" show nvidia-cuda-nvrtc-cu12 2>/dev/null | sed -n 's/^Version: //p' || true)"
case "$version" in
  *'*'*) want_match=no ;;  # a wildcard: accept whatever is installed if it matches the prefix
  *) want_match=yes ;;
esac
need_install=no
if [ -z "$(find_one 'libnvrtc.so.12')" ] || [ -z "$(find_one 'cuda_fp16.h')" ]; then
  need_install=yes
elif [ "$want_match" = yes ] && [ "$have_version" != "$version" ]; then
  need_install=yes
elif [ "$want_match" = no ] && [[ "$have_version" != ${version%\*}* ]]; then
  need_install=yes
fi
if [ "$need_install" = yes ]; then
  say "installing nvidia-cuda-nvrtc-cu12==$version and nvidia-cuda-runtime-cu12 (about 30 s)"
  "$dir/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvrtc-cu12==$version" "nvidia-cuda-runtime-cu12==${version%.*}.*" >&2 ||
    "$dir/bin/pip" install --quiet --disable-pip-version-check \
      "nvidia-cuda-nvrtc-cu12==$version" nvidia-cuda-runtime-cu12 >&2 ||
    { say "pip install failed"; exit 1; }
fi
if [ "$with_cublas" = yes ] && [ -z "$(find_one 'libcublas.so.12')" ]; then
  say "installing nvidia-cublas-cu12 (about 600 MB)"
  "$dir/bin/pip" install --quiet --disable-pip-version-check nvidia-cublas-cu12 >&2 ||
    { say "pip install nvidia-cublas-cu12 failed"; exit 1; }
fi
if [ "$with_ptxas" = yes ] && [ -z "$(find_one 'ptxas')" ]; then
  say "installing nvidia-cuda-nvcc-cu12==$version for ptxas (about 10 s)"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvcc-cu12==$version" >&2 ||
    { say "pip install nvidia-cuda-nvcc-cu12 failed"; exit 1; }
fi

nvrtc_lib="$(find_one 'libnvrtc.so.12')"
header="$(find_one 'cuda_fp16.h')"
if [ -z "$nvrtc_lib" ] || [ -z "$header" ]; then
  say "libnvrtc.so.12 or cuda_fp16.h not found under $dir after installing"
  exit 1
fi
libs="$(dirname "$nvrtc_lib")"
cublas_lib="$(find_one 'libcublas.so.12')"
[ -n "$cublas_lib" ] && libs="$libs:$(dirname "$cublas_lib")"
say "NVRTC $("$dir/bin/pip" show nvidia-cuda-nvrtc-cu12 | sed -n 's/^Version: //p') in $libs"
echo "export LD_LIBRARY_PATH=\"$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export STRATA_NVRTC_INCLUDE=\"$(dirname "$header")\""
ptxas="$(find "$dir" -name ptxas -type f -print -quit 2>/dev/null)"
[ -n "$ptxas" ] && echo "export STRATA_PTXAS=\"$ptxas\""
exit 0
