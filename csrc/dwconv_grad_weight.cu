// lkconv CUDA backend: grad_weight.
//
//   dW[c, kh, kw] = sum_{n, oh, ow} x[n, c, oh*sh - pt + kh*dil_h, ow*sw - pl + kw*dil_w] * g[n, c, oh, ow]
//
// Two kernels, always deterministic (no atomics):
//  1. grad_weight_partial_kernel: grid (C, splits).  CTA (c, s) reduces the flattened positions
//     r = (n, oh, ow) in [s*chunk, (s+1)*chunk) for every tap.  Its 256 threads form P tap slots x L
//     lanes (P = min(taps, 256), L = 256 / P); a thread sums its tap over r = lane, lane+L, ...
//     in fp32, then lane partials are added in lane order (fixed) and written to
//     partial[s, c, tap].
//  2. grad_weight_reduce_kernel: dW[c, tap] = sum_{s = 0..splits-1} partial[s, c, tap] in split order, cast
//     once to the output dtype.
// The split count depends only on the shapes (grad_weight_splits), so results are bitwise reproducible.
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "dwconv_launch.h"
#include "dwconv_convert.cuh"

namespace lkconv {

constexpr int GW_THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(GW_THREADS) grad_weight_partial_kernel(GradWeightArgs a) {
  using A = typename Acc<T>::type;
  __shared__ A red[GW_THREADS];
  const int64_t c = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t taps = a.KH * a.KW;
  const int64_t R = a.N * a.Ho * a.Wo;
  const int64_t chunk = ceil_div(R, a.splits);
  const int64_t r0 = s * chunk;
  const int64_t r1 = (r0 + chunk < R) ? r0 + chunk : R;
  const int P = taps < GW_THREADS ? (int)taps : GW_THREADS;
  const int L = GW_THREADS / P;
  const int slot = threadIdx.x % P, lane = threadIdx.x / P;  // lane may be >= L: idle thread
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ g = static_cast<const T*>(a.g);
  float* part = a.partial + (s * a.C + c) * taps;

  for (int64_t base = 0; base < taps; base += P) {
    const int64_t tap = base + slot;
    A acc = 0;
    if (lane < L && tap < taps) {
      const int64_t kh = tap / a.KW, kw = tap % a.KW;
      // position r = (n * Ho + oh) * Wo + ow, advanced incrementally (no int64 division per step)
      int64_t r = r0 + lane;
      int64_t ow = r % a.Wo, oh = (r / a.Wo) % a.Ho, n = r / (a.Wo * a.Ho);
      for (; r < r1; r += L) {
        const int64_t ih = oh * a.sh - a.pt + kh * a.dil_h;
        const int64_t iw = ow * a.sw - a.pl + kw * a.dil_w;
        if (ih >= 0 && ih < a.H && iw >= 0 && iw < a.W) {
          acc += (A)Cvt<T>::to_f(x[n * a.xs[0] + c * a.xs[1] + ih * a.xs[2] + iw * a.xs[3]]) *
                 (A)Cvt<T>::to_f(g[n * a.gs[0] + c * a.gs[1] + oh * a.gs[2] + ow * a.gs[3]]);
        }
        ow += L;
        while (ow >= a.Wo) {
          ow -= a.Wo;
          if (++oh == a.Ho) { oh = 0; ++n; }
        }
      }
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    if (lane == 0 && tap < taps) {
      A sum = 0;
      for (int l = 0; l < L; ++l) sum += red[l * P + slot];  // fixed order
      part[tap] = (float)sum;
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void grad_weight_reduce_kernel(GradWeightArgs a) {
  const int64_t taps = a.KH * a.KW;
  const int64_t total = a.C * taps;
  T* out = static_cast<T*>(a.grad_w);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    float sum = 0.f;
    for (int64_t s = 0; s < a.splits; ++s) sum += a.partial[s * total + i];  // fixed order
    out[i] = Cvt<T>::from_f(sum);
  }
}

int64_t grad_weight_splits(int64_t N, int64_t Ho, int64_t Wo, int64_t C) {
  // ~2048 positions per CTA at least, at most 1024 splits, and no more CTAs than needed for ~2k total
  const int64_t R = N * Ho * Wo;
  int64_t s = ceil_div(R, 2048);
  const int64_t want_ctas = 2048;
  const int64_t by_c = ceil_div(want_ctas, C > 0 ? C : 1);
  if (s > by_c) s = by_c;
  if (s > 1024) s = 1024;  // (so also within kMaxGridYZ, the grid y dimension)
  if (s < 1) s = 1;
  return s;
}

namespace {
template <typename T>
void launch_grad_weight_t(const GradWeightArgs& a, cudaStream_t stream) {
  const int64_t total = a.C * a.KH * a.KW;
  if (total == 0) return;
  TORCH_CHECK(a.C <= kMaxGridX && a.splits >= 1 && a.splits <= kMaxGridYZ,
              "lkconv_cuda: grad_weight grid out of range (C=", a.C, ", splits=", a.splits, ")");
  if (a.N * a.Ho * a.Wo > 0) {
    grad_weight_partial_kernel<T><<<dim3((unsigned)a.C, (unsigned)a.splits), GW_THREADS, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_CHECK(a.splits == 1, "lkconv_cuda: empty reduction needs splits == 1");
    C10_CUDA_CHECK(cudaMemsetAsync(a.partial, 0, (size_t)total * sizeof(float), stream));
  }
  int64_t blocks = ceil_div(total, 256);
  if (blocks > kMaxGridYZ) blocks = kMaxGridYZ;  // grid-stride loop covers the rest
  grad_weight_reduce_kernel<T><<<(unsigned)blocks, 256, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace

void launch_grad_weight(const GradWeightArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: launch_grad_weight_t<float>(a, stream); return;
    case DType::kFloat16: launch_grad_weight_t<__half>(a, stream); return;
    case DType::kBFloat16: launch_grad_weight_t<__nv_bfloat16>(a, stream); return;
  }
  TORCH_CHECK(false, "lkconv_cuda: unsupported dtype code ", (int)a.dtype, " (float32, float16, bfloat16 only)");
}

}  // namespace lkconv
