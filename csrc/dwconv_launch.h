// Launchers implemented in the .cu files, called by the host code in dwconv_ops.cpp.
#pragma once
#include <cuda_runtime.h>
#include "dwconv_params.h"

namespace lkconv {

// Forward-style pass y = conv(x, w) (+bias): the forward, and the stride-1 grad_input (the forward
// of grad_out with the flipped kernel).  force_generic: use the simple kernel only.
// Throws (c10::Error) on launch failure.
void launch_forward(const ConvArgs& a, bool force_generic, cudaStream_t stream);

// grad_input for stride > 1 (any dilation): direct gather kernel.
//   a.x = grad_out (N, C, Ho, Wo) with strides a.xs, a.y = grad_input (N, C, H, W) with a.ys,
//   a.Ho/a.Wo = grad_out spatial size, a.H/a.W = grad_input spatial size; pt/pl/sh/sw/dil_h/dil_w as in forward.
void launch_grad_input_strided(const ConvArgs& a, cudaStream_t stream);

// grad_weight: split reduction into a.partial, then a deterministic ordered reduction into a.grad_w.
void launch_grad_weight(const GradWeightArgs& a, cudaStream_t stream);

// the split count launch_grad_weight expects a.splits / the workspace to have (depends on shapes only)
int64_t grad_weight_splits(int64_t N, int64_t Ho, int64_t Wo, int64_t C);

}  // namespace lkconv
