#!/usr/bin/env bash
# Patch an unpacked Horovod 0.28.1 sdist (our private build copy, never an installed Horovod) so
# it builds on today's toolchains; scripts/install.sh runs it before `pip wheel`.
#
#   scripts/patch_horovod_sdist.sh /tmp/build/horovod-0.28.1
#
# Each fix is harmless on older toolchains (GCC 11/12, CMake 3.2x, CUDA 12.x):
#   1. C++17 for the C++ sources: PyTorch >= 2.1 headers need it, Horovod asks for C++14
#      (Horovod issues #3996/#4014, fixed upstream by PR #3998 after the last release);
#   2. C++17 for the CUDA kernels (they ask for C++11; CUDA 13's headers need C++17);
#   3. GCC 13 no longer includes <cstdint>, <string> and <stdexcept> transitively
#      (horovod/common/group_table.h, common.h, ... then fail with "'string' in namespace
#      'std' does not name a type"): every C++ file of the build force-includes them.
# CMake 4 (gloo's `cmake_minimum_required(VERSION 2.8.12)`) is handled by install.sh with
# CMAKE_POLICY_VERSION_MINIMUM=3.5 in the environment, not by editing gloo.
#
# Idempotent: a second run on the same tree changes nothing. Exits non-zero, naming the file,
# when a fix cannot be applied (another Horovod version whose files differ).
set -euo pipefail

src="${1:?usage: patch_horovod_sdist.sh <unpacked horovod sdist directory>}"
MARK="# hvd_topk patch (GCC 13)"
fail() { printf '[patch_horovod_sdist] %s\n' "$*" >&2; exit 1; }
[[ -f "$src/CMakeLists.txt" && -d "$src/horovod/common" ]] || fail "$src is not an unpacked Horovod sdist"

# 1. C++17 (top level and the PyTorch extension).
for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    sed -i 's/CMAKE_CXX_STANDARD 14)/CMAKE_CXX_STANDARD 17)/' "$f"
    grep -q 'CMAKE_CXX_STANDARD 17)' "$f" || fail "no CMAKE_CXX_STANDARD 17 in $f"
    ! grep -q 'CMAKE_CXX_STANDARD 14)' "$f" || fail "CMAKE_CXX_STANDARD 14 left in $f"
done

# 2. C++17 for nvcc.
f="$src/horovod/common/ops/cuda/CMakeLists.txt"
sed -i 's/CMAKE_CUDA_STANDARD 11)/CMAKE_CUDA_STANDARD 17)/' "$f"
grep -q 'CMAKE_CUDA_STANDARD 17)' "$f" || fail "no CMAKE_CUDA_STANDARD 17 in $f"

# 3. The standard headers GCC 13 stopped including transitively, for every C++ target of the
#    build (Horovod, gloo, the PyTorch extension); not for nvcc (COMPILE_LANGUAGE:CXX).
f="$src/CMakeLists.txt"
if ! grep -qF "$MARK" "$f"; then
    grep -q '^set(CMAKE_CXX_EXTENSIONS OFF)$' "$f" || fail "no 'set(CMAKE_CXX_EXTENSIONS OFF)' line in $f"
    sed -i "/^set(CMAKE_CXX_EXTENSIONS OFF)\$/a\\
$MARK\\
add_compile_options(\"\$<\$<COMPILE_LANGUAGE:CXX>:SHELL:-include cstdint -include string -include stdexcept>\")" "$f"
fi
[[ "$(grep -c -F "$MARK" "$f")" == 1 ]] || fail "the GCC 13 include fix is not in $f exactly once"
grep -qF 'SHELL:-include cstdint -include string -include stdexcept>")' "$f" \
    || fail "the GCC 13 include line is missing from $f"
