// Launchers implemented in the .cu files, called by the host code in dwconv_ops.cpp.
#pragma once
#include <cuda_runtime.h>
#include "dwconv_params.h"

namespace lkconv {

// Forward-style pass y = conv(x, w) (+bias): the forward, and the stride-1 grad_input (the forward
// of grad_out with the flipped kernel).  force_generic: use the simple kernel only.
// Throws (c10::Error) on launch failure.
void launch_forward(const ConvArgs& a, bool force_generic, cudaStream_t stream);

// fp32, stride 1, dilation 1, KH, KW <= 64, sm80+: the register-blocked fp32_rb_kernel
// (dwconv_forward_fp32.cu); false when it does not apply (the caller falls back)
bool try_fp32_rb(const ConvArgs& a, cudaStream_t stream);

// fp32 with a.allow_tf32, stride 1, dilation 1, KH, KW <= 64, sm80+: toeplitz_tf32_kernel (TF32 tensor cores,
// dwconv_toeplitz_tf32.cu); false when it does not apply (the caller runs the IEEE fp32 kernels)
bool try_toeplitz_tf32(const ConvArgs& a, cudaStream_t stream);

// grad_input for stride > 1 (any dilation): the small-plane GEMM where it applies, else a direct gather kernel
// (force_generic: the gather kernel only).
//   a.x = grad_out (N, C, Ho, Wo) with strides a.xs, a.y = grad_input (N, C, H, W) with a.ys,
//   a.Ho/a.Wo = grad_out spatial size, a.H/a.W = grad_input spatial size; pt/pl/sh/sw/dil_h/dil_w as in forward.
void launch_grad_input_strided(const ConvArgs& a, bool force_generic, cudaStream_t stream);

// grad_weight: split reduction into a.partial, then a deterministic ordered reduction into a.grad_w.
// force_generic: grad_weight_partial_kernel only (else the staged fast kernels where they apply).
void launch_grad_weight(const GradWeightArgs& a, bool force_generic, cudaStream_t stream);

// a.vec_x / a.vec_g: the cp.async vector widths (elements) the pointers and strides allow (1 = scalar);
// needs a.x, a.g, a.xs, a.gs, a.dtype, a.sm_major
void fill_grad_weight_vectors(GradWeightArgs& a);

// the split count launch_grad_weight expects a.splits / the workspace to have (shapes, dtype, device
// generation and force_generic only; needs every field but the pointers' data and a.splits)
int64_t grad_weight_splits(const GradWeightArgs& a, bool force_generic);

}  // namespace lkconv
