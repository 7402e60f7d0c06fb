// Launchers implemented in the .cu files, called by the host code in dwconv_ops.cpp.
#pragma once
#include <cuda_runtime.h>
#include "dwconv_params.h"

namespace lkconv {

// Forward-style pass y = conv(x, w) (+bias).  force_generic: use the simple kernel only.
// Returns the algorithm used.  Throws (c10::Error) on launch failure.
Algo launch_conv(const ConvArgs& a, bool force_generic, cudaStream_t stream);

// grad_input for stride > 1 (any dilation): direct gather kernel.
//   a.x = grad_out (N, C, Ho, Wo) with strides a.xs, a.y = grad_input (N, C, H, W) with a.ys,
//   a.Ho/a.Wo = grad_out spatial size, a.H/a.W = grad_input spatial size; pt/pl/sh/sw/dh/dw as in forward.
void launch_dgrad_strided(const ConvArgs& a, cudaStream_t stream);

// grad_weight: split reduction into a.partial, then a deterministic ordered reduction into a.dw.
void launch_wgrad(const WgradArgs& a, cudaStream_t stream);

// the split count launch_wgrad expects a.splits / the workspace to have (depends on shapes only)
int64_t wgrad_splits(int64_t N, int64_t Ho, int64_t Wo, int64_t C);

}  // namespace lkconv
