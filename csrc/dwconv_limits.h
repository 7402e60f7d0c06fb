// Size limits of the CUDA backend, in one place.  Plain decimal literals, so that the Python mirror
// (lkconv/backends/cuda.py CUDA_LIMITS, which the backend's check() uses to decline what the kernels
// cannot index) reads them; tests/test_backend_cuda.py checks the two agree.
#pragma once
#include <cstdint>

namespace lkconv {

constexpr int64_t kMaxKernelSide = 65535;          // KH and KW, each
constexpr int64_t kMaxKernelTaps = 2147483647;     // KH * KW (2^31 - 1: int32 tap index)
constexpr int64_t kMaxGeometry = 1073741824;       // stride, dilation and each padding (2^30)
constexpr int64_t kMaxFastKernelSide = 1024;       // KH, KW of the fp32 blocked and Toeplitz kernels
constexpr int64_t kMaxGridX = 2147483647;          // CUDA grid x (2^31 - 1)
constexpr int64_t kMaxGridYZ = 65535;              // CUDA grid y and z
constexpr int64_t kMaxGridStrideBlocks = 1048576;  // blocks of a grid-stride launch (2^20); the loop covers the rest

}  // namespace lkconv
