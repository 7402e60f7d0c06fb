// grad_weight on small planes by row pairs (dwconv_small_plane_gw_rows.cu): fp16/bf16, stride 1, dilation 1.
//
//   R_dh[ow, iw] = sum_{n, oh} dY[n, oh, ow] * X[n, oh + dh, iw]        (dh = ih - oh = kh - pt)
//   dW[kh, kw]   = sum_{ow} R_{kh - pt}[ow, ow + kw - pl]              (0 <= ow < Wo, 0 <= ow + kw - pl < W)
//
// One GEMM per dh with M = Wo (padded to 16), N = W (padded to 16), reduction over (n, oh); the tap sums then
// run over (#dh) x Wo entries instead of the (H W) x (Ho Wo) of small_plane_gw_mma_kernel's G = X^T dY.
#pragma once
#include <cuda_runtime.h>
#include "dwconv_params.h"

namespace lkconv {

constexpr int GR_THREADS = 256, GR_WARPS = 8;
constexpr int GR_ND = 4;        // dh per warp (accumulator sets in registers)
constexpr int GR_MB = 32;       // images per staged chunk (two chunks in flight: double buffer)
constexpr int GR_MAX_SIDE = 16; // H, W, Ho, Wo <= 16: one m16 tile of output columns, two n8 tiles of input columns
constexpr int GR_MIN_W = 9;     // W <= 8 stays on small_plane_gw_mma_kernel (one n8 tile would be dead)
constexpr int GR_RP = 24;       // fp32 pitch of an R_dh row in the epilogue (8 mod 32 words: conflict-free float2)

// The applicability rule, in one place (mirrored by csrc/kernel_emulation.py gr_rule and
// lkconv/static/model.py gr_applies): the pass is one small_plane_gw_mma_kernel would take (small_plane_rule
// true for grad_weight: 16-bit, sm80+, both planes <= 256 px, F_c dense enough, ...), and in addition stride 1,
// dilation 1, GR_MIN_W <= W <= 16, Wo <= 16, H <= 16, Ho <= 16 (any padding, negative too, any K).  Where it
// holds, the launcher runs small_plane_gw_rows_kernel instead of small_plane_gw_mma_kernel.
bool gw_rows_applies(const GradWeightArgs& a);
// its split count (batch groups) or 0 when the rule does not hold
int64_t gw_rows_splits(const GradWeightArgs& a);
void launch_gw_rows(const GradWeightArgs& a, cudaStream_t stream);

}  // namespace lkconv
