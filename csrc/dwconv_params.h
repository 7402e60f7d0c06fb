// lkconv CUDA backend: the parameter struct shared by the host code (dwconv_ops.cpp) and the
// kernels (dwconv_forward.cu, dwconv_grad_weight.cu).  Plain C++ (no torch headers) so the .cu files
// compile without ATen.
//
// Convention (one convolution "pass" = y = conv(x, w) with explicit geometry):
//   y[n, c, oh, ow] = sum_{kh, kw} x[n, c, oh*sh - pt + kh*dil_h, ow*sw - pl + kw*dil_w] * w[c, kh, kw]
// Taps that read outside [0, H) x [0, W) contribute zero.  pt/pl are SIGNED: the stride-1 grad_input
// is this forward with the flipped kernel and pt' = dil_h*(KH-1) - pt, which may be negative.
// All sizes and strides are in elements and int64, so > 2^31-element tensors index correctly.
#pragma once
#include <cstdint>

#include "dwconv_limits.h"

namespace lkconv {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ConvArgs {
  // pointers (x: input of this pass, w: (C, KH, KW) contiguous, bias: (C,) or nullptr, y: output)
  const void* x = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;
  // sizes
  int64_t N = 0, C = 0, H = 0, W = 0;  // x
  int64_t Ho = 0, Wo = 0;              // y (N, C, Ho, Wo)
  int64_t KH = 1, KW = 1;
  int64_t sh = 1, sw = 1, dil_h = 1, dil_w = 1;  // stride, dilation
  int64_t pt = 0, pl = 0;  // signed top/left padding (bottom/right are implied by Ho/Wo)
  // strides in elements, order (n, c, h, w)
  int64_t xs[4] = {0, 0, 0, 0};
  int64_t ys[4] = {0, 0, 0, 0};
  DType dtype = DType::kFloat32;
  // device facts the launchers need
  int sm_major = 0;          // compute capability major of the device
  int max_smem_optin = 0;    // cudaDevAttrMaxSharedMemoryPerBlockOptin
  // fp32 only: PyTorch allows TF32 for convolutions (algo 2): toeplitz_tf32_kernel where it applies
  bool allow_tf32 = false;
};

// grad_weight:  dW[c, kh, kw] = sum_{n, oh, ow} x[n, c, oh*sh - pt + kh*dil_h, ow*sw - pl + kw*dil_w] * g[n, c, oh, ow]
struct GradWeightArgs {
  const void* x = nullptr;   // input (N, C, H, W)
  const void* g = nullptr;   // grad_out (N, C, Ho, Wo)
  void* grad_w = nullptr;    // output (C, KH, KW) contiguous, dtype = dtype
  float* partial = nullptr;  // workspace (splits, C, KH*KW) fp32
  int64_t N = 0, C = 0, H = 0, W = 0, Ho = 0, Wo = 0, KH = 1, KW = 1;
  int64_t sh = 1, sw = 1, dil_h = 1, dil_w = 1;  // stride, dilation
  int64_t pt = 0, pl = 0;
  int64_t xs[4] = {0, 0, 0, 0};
  int64_t gs[4] = {0, 0, 0, 0};
  int64_t splits = 1;        // reduction split count (depends on shapes only -> reproducible)
  DType dtype = DType::kFloat32;
  int sm_major = 0;          // compute capability major of the device
  int vec_x = 1, vec_g = 1;  // cp.async vector widths in elements for x / g staging (1 = scalar loads)
  int max_smem_optin = 0;    // cudaDevAttrMaxSharedMemoryPerBlockOptin (the small-plane kernels' budget)
};

}  // namespace lkconv
