// Small planes (H*W <= 256): the batch-as-rows GEMM per channel (dwconv_small_plane.cu).
//
//   forward / grad_input:  Y[N x Q] = X[N x P] . F_c        (F_c: P x Q, or its transpose for grad_input)
//   grad_weight:           G = X^T[P x N] . dY[N x Q], then dW[c, kh, kw] = the sum of G over the pixel pairs of tap (kh, kw)
//
// F_c[p, q] = w[c, kh, kw] where input pixel p = (oh*sh - pt + kh*dil_h, ow*sw - pl + kw*dil_w) and output pixel
// q = (oh, ow), zero elsewhere: exact for any stride, padding (also negative) and dilation.
#pragma once
#include <cuda_runtime.h>
#include "dwconv_params.h"

namespace lkconv {

// The applicability rule (mirrored by lkconv/backends/cuda.py small_plane_applies): both planes of the pass
// have at most SP_MAX_PIX pixels, the filter has at most SP_MAX_TAPS taps (staged in shared memory), F_c is
// not too sparse (min(KH, H) * min(KW, W) * 8 >= H * W, in the forward geometry), the 16-bit kernels need
// sm80+, and the CTA's shared memory (at the smallest pixel block that fits) is within the device's opt-in
// limit and SP_SMEM_BUDGET.
constexpr int SP_MAX_PIX = 256;
constexpr int SP_MAX_TAPS = 4096;
constexpr int SP_SMEM_BUDGET = 112 * 1024;

// forward-style pass (a as for launch_forward; transposed = false) or grad_input at any stride (a as for
// launch_grad_input_strided; transposed = true: Y = dY . F_c^T).  Returns false (nothing launched) when the
// rule above does not hold.
bool try_small_plane_forward(const ConvArgs& a, bool transposed, cudaStream_t stream);

// grad_weight: the split count (q-blocks x batch groups) the small-plane kernel writes into a.partial, or 0
// when it does not apply; the launcher then runs grad_weight_reduce_kernel over those splits.
int64_t small_plane_grad_weight_splits(const GradWeightArgs& a);
void launch_small_plane_grad_weight(const GradWeightArgs& a, cudaStream_t stream);

}  // namespace lkconv
