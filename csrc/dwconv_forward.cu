// lkconv CUDA backend: forward-style convolution kernels (forward, and grad_input, which for
// stride 1 is the forward with the flipped kernel and padding dilation*(K-1) - p).
//
//   generic_conv_kernel      one thread per output, any dtype/geometry/strides.  Obviously correct;
//                            every case the fast kernels do not cover runs here.
//   grad_input_strided_kernel     grad_input for stride > 1 (gather form), any dilation.
//   fp32_blocked_kernel      fp32, stride 1, dilation 1: CUDA-core direct conv, input tile + filter in
//                            shared memory, each thread a strip of 8 outputs in one row.
//   toeplitz_mma_kernel      fp16/bf16, stride 1, dilation 1, sm80+, KH, KW <= 64: the row-Toeplitz
//                            implicit GEMM on tensor cores with raw ldmatrix + mma.sync.m16n8k16 (fp32
//                            accumulate), 8 images at one output row as the mma's n dimension, Toeplitz A
//                            fragments formed per lane from the filter rows.
//   toeplitz_wmma_kernel     the same GEMM with nvcuda::wmma m16n16k16 and Toeplitz blocks rebuilt in shared
//                            memory per kernel row: larger kernels.
//
// Index convention (see dwconv_params.h):
//   y[n,c,oh,ow] = sum_{kh,kw} x[n,c, oh*sh - pt + kh*dil_h, ow*sw - pl + kw*dil_w] * w[c,kh,kw]
#include <cuda_runtime.h>
#include <mma.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "dwconv_launch.h"
#include "dwconv_convert.cuh"
#include "dwconv_mma.cuh"
#include "dwconv_small_plane.h"

namespace lkconv {

// ------------------------------------------------------------------------------------------------
// generic kernel
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void generic_conv_kernel(ConvArgs a) {
  using A = typename Acc<T>::type;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ w = static_cast<const T*>(a.w);
  const T* __restrict__ bias = static_cast<const T*>(a.bias);
  T* __restrict__ y = static_cast<T*>(a.y);
  const int64_t total = a.N * a.C * a.Ho * a.Wo;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = idx;
    const int64_t ow = t % a.Wo; t /= a.Wo;
    const int64_t oh = t % a.Ho; t /= a.Ho;
    const int64_t c = t % a.C;
    const int64_t n = t / a.C;
    const T* xc = x + n * a.xs[0] + c * a.xs[1];
    const T* wc = w + c * a.KH * a.KW;
    A acc = 0;
    for (int64_t kh = 0; kh < a.KH; ++kh) {
      const int64_t ih = oh * a.sh - a.pt + kh * a.dil_h;
      if (ih < 0 || ih >= a.H) continue;
      for (int64_t kw = 0; kw < a.KW; ++kw) {
        const int64_t iw = ow * a.sw - a.pl + kw * a.dil_w;
        if (iw < 0 || iw >= a.W) continue;
        acc += (A)Cvt<T>::to_f(xc[ih * a.xs[2] + iw * a.xs[3]]) * (A)Cvt<T>::to_f(wc[kh * a.KW + kw]);
      }
    }
    if (bias != nullptr) acc += (A)Cvt<T>::to_f(bias[c]);
    y[n * a.ys[0] + c * a.ys[1] + oh * a.ys[2] + ow * a.ys[3]] = Cvt<T>::from_f(acc);
  }
}

// ------------------------------------------------------------------------------------------------
// grad_input, stride > 1: gx[n,c,ih,iw] = sum over taps with (ih + pt - kh*dil_h) = oh*sh, 0 <= oh < Ho
//   here a.x = grad_out (spatial a.Ho x a.Wo), a.y = grad_input (spatial a.H x a.W)
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void grad_input_strided_kernel(ConvArgs a) {
  using A = typename Acc<T>::type;
  const T* __restrict__ g = static_cast<const T*>(a.x);
  const T* __restrict__ w = static_cast<const T*>(a.w);
  T* __restrict__ gx = static_cast<T*>(a.y);
  const int64_t total = a.N * a.C * a.H * a.W;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = idx;
    const int64_t iw = t % a.W; t /= a.W;
    const int64_t ih = t % a.H; t /= a.H;
    const int64_t c = t % a.C;
    const int64_t n = t / a.C;
    const T* gc = g + n * a.xs[0] + c * a.xs[1];
    const T* wc = w + c * a.KH * a.KW;
    A acc = 0;
    for (int64_t kh = 0; kh < a.KH; ++kh) {
      const int64_t th = ih + a.pt - kh * a.dil_h;
      if (th < 0 || th % a.sh != 0) continue;
      const int64_t oh = th / a.sh;
      if (oh >= a.Ho) continue;
      for (int64_t kw = 0; kw < a.KW; ++kw) {
        const int64_t tw = iw + a.pl - kw * a.dil_w;
        if (tw < 0 || tw % a.sw != 0) continue;
        const int64_t ow = tw / a.sw;
        if (ow >= a.Wo) continue;
        acc += (A)Cvt<T>::to_f(gc[oh * a.xs[2] + ow * a.xs[3]]) * (A)Cvt<T>::to_f(wc[kh * a.KW + kw]);
      }
    }
    gx[n * a.ys[0] + c * a.ys[1] + ih * a.ys[2] + iw * a.ys[3]] = Cvt<T>::from_f(acc);
  }
}

// ------------------------------------------------------------------------------------------------
// fp32, stride 1, dilation 1: register-blocked direct convolution.
//   CTA: 256 threads, output tile FB_H x FB_W = 32 x 64 of one (n, c); thread: 1 row x 8 columns.
//   Shared: input tile (FB_H+KH-1) x (FB_W+KW-1) (zeros outside the image) and the filter.
//   Inner loop: a sliding window of 8 inputs in registers; per tap 1 filter + 1 input smem load
//   feed 8 FMAs.  Taps whose rows/columns fall entirely in the zero border are skipped.
// ------------------------------------------------------------------------------------------------
constexpr int FB_H = 32, FB_W = 64, FB_STRIP = 8, FB_THREADS = 256;
static_assert(FB_H * (FB_W / FB_STRIP) == FB_THREADS, "fp32 tile/thread mismatch");

__host__ __device__ inline int64_t fp32_smem_bytes(int64_t KH, int64_t KW) {
  return ((FB_H + KH - 1) * (FB_W + KW - 1) + KH * KW) * (int64_t)sizeof(float);
}

__global__ void __launch_bounds__(FB_THREADS) fp32_blocked_kernel(ConvArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* Xs = reinterpret_cast<float*>(smem_raw);
  const int KH = (int)a.KH, KW = (int)a.KW;
  const int ldx = FB_W + KW - 1;
  const int rows = FB_H + KH - 1;
  float* Fs = Xs + (int64_t)rows * ldx;

  const int64_t nc = blockIdx.x;  // n * C + c
  const int64_t n = nc / a.C, c = nc % a.C;
  const int64_t ow0 = (int64_t)blockIdx.y * FB_W;
  const int64_t oh0 = (int64_t)blockIdx.z * FB_H;
  const float* __restrict__ xc = static_cast<const float*>(a.x) + n * a.xs[0] + c * a.xs[1];
  const float* __restrict__ wc = static_cast<const float*>(a.w) + c * a.KH * a.KW;

  // stage: Xs[r][q] = x[oh0 - pt + r, ow0 - pl + q] (0 outside)
  for (int e = threadIdx.x; e < rows * ldx; e += FB_THREADS) {
    const int r = e / ldx, q = e % ldx;
    const int64_t ih = oh0 - a.pt + r, iw = ow0 - a.pl + q;
    Xs[e] = (ih >= 0 && ih < a.H && iw >= 0 && iw < a.W) ? __ldg(xc + ih * a.xs[2] + iw * a.xs[3]) : 0.f;
  }
  for (int e = threadIdx.x; e < KH * KW; e += FB_THREADS) Fs[e] = __ldg(wc + e);
  __syncthreads();

  const int row = threadIdx.x / (FB_W / FB_STRIP);
  const int c0 = (threadIdx.x % (FB_W / FB_STRIP)) * FB_STRIP;
  const int64_t oh = oh0 + row, owb = ow0 + c0;
  if (oh >= a.Ho || owb >= a.Wo) return;  // no __syncthreads() below

  // taps touching the image: ih = oh - pt + kh in [0, H); iw = ow - pl + kw in [0, W) for some ow of the strip
  const int64_t kh_lo64 = a.pt - oh, kh_hi64 = a.H + a.pt - oh;
  const int kh_lo = (int)(kh_lo64 < 0 ? 0 : (kh_lo64 > KH ? KH : kh_lo64));
  const int kh_hi = (int)(kh_hi64 < 0 ? 0 : (kh_hi64 > KH ? KH : kh_hi64));
  const int64_t kw_lo64 = a.pl - (owb + FB_STRIP - 1), kw_hi64 = a.W + a.pl - owb;
  const int kw_lo = (int)(kw_lo64 < 0 ? 0 : (kw_lo64 > KW ? KW : kw_lo64));
  const int kw_hi = (int)(kw_hi64 < 0 ? 0 : (kw_hi64 > KW ? KW : kw_hi64));

  float acc[FB_STRIP];
#pragma unroll
  for (int j = 0; j < FB_STRIP; ++j) acc[j] = 0.f;

  for (int kh = kh_lo; kh < kh_hi; ++kh) {
    const float* xr = Xs + (row + kh) * ldx + c0;  // xr[kw + j] = input for output column c0+j, tap kw
    const float* fr = Fs + kh * KW;
    if (kw_lo >= kw_hi) break;
    float xv[FB_STRIP];
#pragma unroll
    for (int j = 0; j < FB_STRIP; ++j) xv[j] = xr[kw_lo + j];
    for (int kw = kw_lo; kw < kw_hi; ++kw) {
      const float f = fr[kw];
#pragma unroll
      for (int j = 0; j < FB_STRIP; ++j) acc[j] = fmaf(xv[j], f, acc[j]);
      if (kw + 1 < kw_hi) {
#pragma unroll
        for (int j = 0; j < FB_STRIP - 1; ++j) xv[j] = xv[j + 1];
        xv[FB_STRIP - 1] = xr[kw + FB_STRIP];  // column c0 + kw + 8 <= c0 + KW + 6 < ldx
      }
    }
  }
  const float b = a.bias != nullptr ? static_cast<const float*>(a.bias)[c] : 0.f;
  float* yp = static_cast<float*>(a.y) + n * a.ys[0] + c * a.ys[1] + oh * a.ys[2];
#pragma unroll
  for (int j = 0; j < FB_STRIP; ++j) {
    const int64_t ow = owb + j;
    if (ow < a.Wo) yp[ow * a.ys[3]] = acc[j] + b;
  }
}

// ------------------------------------------------------------------------------------------------
// fp16/bf16, stride 1, dilation 1: row-Toeplitz implicit GEMM on tensor cores (nvcuda::wmma).
//
// For one channel and one kernel row kh the 1-D convolution along W is a matrix product
//   Y[m, nn] += sum_i A[m, i] * B_kk[i, nn]
//   A[m, i]     = Xs[warp*16 + kh + m][16*j + 16*kk + i]       (input rows/columns, staged in smem)
//   B_kk[i, nn] = f[kh, 16*kk + i - nn]  if 0 <= 16*kk + i - nn < KW, else 0   (Toeplitz of the filter row)
// where Xs[r][q] = x[oh0 - pt + r, ow0 - pl + q] and Y[m, nn] is output (oh0 + warp*16 + m, ow0 + 16*j + nn).
// Check: input column of A = ow0 - pl + 16j + 16kk + i = ow + kw - pl with kw = 16kk + i - nn. With
// KK = ceil((KW + 15) / 16) chunks every kw in [0, KW) and every nn in [0, 16) is covered exactly once.
//
// CTA: TC_WARPS warps; tile TC_BM = 16*TC_WARPS output rows (16 per warp) x TC_BN = 16*TC_NB output columns
// of one (n, c).  Shared memory: Cs (fp32 staging of the accumulators), Xs ((TC_BM+KH-1) x 16*(TC_NB+KK-1)), Ts (KK 16x16
// Toeplitz blocks for the current kh), Fs (the filter).  Kernel rows whose input rows all lie in the
// zero border are skipped (CTA-uniform), as are per-warp rows and per-(j, kk) column chunks outside the image.
// Two tile configurations (template <WARPS, NB>): the big one (4 warps x 4 column fragments = 64 x 64
// outputs) and a small one (1 x 1 = 16 x 16) for small feature maps (7x7, 14x14, 28x28), where a 64 x 64
// tile would mostly compute padding.  The launcher picks the one with less wasted area.
// ------------------------------------------------------------------------------------------------

struct TcLayout {
  int64_t KK, ldx, rows, cs_bytes, xs_bytes, ts_bytes, fs_bytes, total;
};
__host__ __device__ inline TcLayout tc_layout(int64_t KH, int64_t KW, int TC_WARPS, int TC_NB) {
  const int TC_BM = 16 * TC_WARPS, TC_BN = 16 * TC_NB;
  TcLayout L;
  L.KK = (KW + 15 + 15) / 16;           // ceil((KW + 15) / 16)
  L.ldx = 16 * (TC_NB + L.KK - 1);      // multiple of 16 elements: rows stay 32-byte aligned
  L.rows = TC_BM + KH - 1;
  L.cs_bytes = (int64_t)TC_WARPS * 16 * TC_BN * 4;
  L.xs_bytes = L.rows * L.ldx * 2;
  L.ts_bytes = L.KK * 256 * 2;
  L.fs_bytes = ((KH * KW * 2 + 31) / 32) * 32;
  L.total = L.cs_bytes + L.xs_bytes + L.ts_bytes + L.fs_bytes;
  return L;
}

template <typename T, int TC_WARPS, int TC_NB>
__global__ void __launch_bounds__(32 * TC_WARPS) toeplitz_wmma_kernel(ConvArgs a) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  using namespace nvcuda;
  constexpr int TC_BM = 16 * TC_WARPS, TC_BN = 16 * TC_NB, TC_THREADS = 32 * TC_WARPS;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const int KH = (int)a.KH, KW = (int)a.KW;
  const TcLayout L = tc_layout(KH, KW, TC_WARPS, TC_NB);
  const int KK = (int)L.KK, ldx = (int)L.ldx, rows = (int)L.rows;
  float* Cs = reinterpret_cast<float*>(smem_tc);
  T* Xs = reinterpret_cast<T*>(smem_tc + L.cs_bytes);
  T* Ts = reinterpret_cast<T*>(smem_tc + L.cs_bytes + L.xs_bytes);
  T* Fs = reinterpret_cast<T*>(smem_tc + L.cs_bytes + L.xs_bytes + L.ts_bytes);

  const int64_t nc = blockIdx.x;
  const int64_t n = nc / a.C, c = nc % a.C;
  const int64_t ow0 = (int64_t)blockIdx.y * TC_BN;
  const int64_t oh0 = (int64_t)blockIdx.z * TC_BM;
  const T* __restrict__ xc = static_cast<const T*>(a.x) + n * a.xs[0] + c * a.xs[1];
  const T* __restrict__ wc = static_cast<const T*>(a.w) + c * a.KH * a.KW;
  const T zero = Cvt<T>::from_f(0.f);

  for (int e = threadIdx.x; e < rows * ldx; e += TC_THREADS) {
    const int r = e / ldx, q = e % ldx;
    const int64_t ih = oh0 - a.pt + r, iw = ow0 - a.pl + q;
    Xs[e] = (ih >= 0 && ih < a.H && iw >= 0 && iw < a.W) ? xc[ih * a.xs[2] + iw * a.xs[3]] : zero;
  }
  for (int e = threadIdx.x; e < KH * KW; e += TC_THREADS) Fs[e] = wc[e];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[TC_NB];
#pragma unroll
  for (int j = 0; j < TC_NB; ++j) wmma::fill_fragment(acc[j], 0.f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;

  // kernel rows whose CTA input rows [oh0 - pt + kh, oh0 - pt + kh + TC_BM) meet [0, H)
  int64_t kh_lo = a.pt - oh0 - TC_BM + 1, kh_hi = a.H + a.pt - oh0;
  kh_lo = kh_lo < 0 ? 0 : (kh_lo > KH ? KH : kh_lo);
  kh_hi = kh_hi < 0 ? 0 : (kh_hi > KH ? KH : kh_hi);
  __syncthreads();  // Xs, Fs ready

  for (int kh = (int)kh_lo; kh < (int)kh_hi; ++kh) {
    // Toeplitz blocks of filter row kh
    for (int e = threadIdx.x; e < KK * 256; e += TC_THREADS) {
      const int kk = e >> 8, i = (e >> 4) & 15, nn = e & 15;
      const int kw = 16 * kk + i - nn;
      Ts[e] = (kw >= 0 && kw < KW) ? Fs[kh * KW + kw] : zero;
    }
    __syncthreads();
    const int64_t ih0 = oh0 - a.pt + warp * 16 + kh;  // input row of this warp's first A row
    if (ih0 + 15 >= 0 && ih0 < a.H) {
      for (int kk = 0; kk < KK; ++kk) {
        wmma::load_matrix_sync(fb, Ts + kk * 256, 16);
#pragma unroll
        for (int j = 0; j < TC_NB; ++j) {
          const int64_t iwc = ow0 - a.pl + 16 * (j + kk);  // first input column of this A chunk
          if (iwc + 15 < 0 || iwc >= a.W) continue;        // chunk entirely in the zero border
          wmma::load_matrix_sync(fa, Xs + (warp * 16 + kh) * ldx + 16 * (j + kk), ldx);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
    }
    __syncthreads();  // Ts is rewritten next iteration
  }

  float* Cw = Cs + warp * 16 * TC_BN;
#pragma unroll
  for (int j = 0; j < TC_NB; ++j) wmma::store_matrix_sync(Cw + 16 * j, acc[j], TC_BN, wmma::mem_row_major);
  __syncwarp();
  const float b = a.bias != nullptr ? Cvt<T>::to_f(static_cast<const T*>(a.bias)[c]) : 0.f;
  T* yc = static_cast<T*>(a.y) + n * a.ys[0] + c * a.ys[1];
  for (int e = lane; e < 16 * TC_BN; e += 32) {
    const int m = e / TC_BN, q = e % TC_BN;
    const int64_t oh = oh0 + warp * 16 + m, ow = ow0 + q;
    if (oh < a.Ho && ow < a.Wo) yc[oh * a.ys[2] + ow * a.ys[3]] = Cvt<T>::from_f(Cw[e] + b);
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// toeplitz_mma_kernel: the row-Toeplitz GEMM with raw ldmatrix + mma.sync.m16n8k16 (fp16/bf16, sm80+,
// stride 1, dilation 1, KH, KW <= 64), "image-rows" tiling.  For one channel c, one kernel row kh and one
// output row oh the 1-D convolution along W of TM_IMG = 8 images at once is the product
//   Y[i, n] += sum_k A_d[i, k] * B_kc[k, n]      (m16 = 16 output columns, n8 = 8 images, k16 = 16 input columns)
//   A_d[i, k]  = f[kh, 16 d + k - col(i) - s0]  (0 outside [0, KW))   the Toeplitz block of offset d
//   B_kc[k, n] = x[n0 + n, c, oh - pt + kh, c0 + 16 kc + k]            the staged input rows (zero outside)
// with output column ow0 + 16 ob + col(i), col(i) = 2 (i % 8) + i / 8 (interleaved mma rows: each lane's four A
// registers are distinct filter words and its C registers adjacent output columns), chunk kc = ob + d,
// c0 = ow0 - pl - s0 (s0 = (ow0 - pl) mod 8, the same for every CTA since ow0 is a multiple of 16) and d in
// [0, nd), nd = ceil((KW + 15 + s0) / 16).  The eight mma columns are eight images at the SAME output row, so
// every column has the same valid kernel rows: no row of the product is border padding (N * Ho need not be a
// multiple of anything; images >= N read a zero row).
//
// CTA = TM_WARPS warps, tile = 8 images x BM output rows (bm, a runtime argument) x 16*NB output columns of one
// channel.  Staged once (cp.async vectors of vec_x elements where aligned, zero-filled halo, then one barrier
// pair): the input rows the tile needs, [max(0, oh0 - pt), min(H, oh0 + bm - 1 - pt + KH)), of the 8 images,
// columns c0 + [0, 16 * nch); a zero row; the filter rows Fe[kh][u] = f[kh, u - TM_FO] and the one-element-shifted
// copy Fo[kh][u] = Fe[kh][u + 1].  A warp takes output-row pairs (oh, oh + 1) (p = warp, warp + TM_WARPS, ...):
// per kernel row kh of the pair's range and per group of DG Toeplitz offsets it
//   - reads the DG A fragments, 4 32-bit words each from Fe / Fo - 1 (built in registers from the filter row,
//     reused by all chunks),
//   - per chunk of the group that meets the image columns (CTA-uniform predicate; chunks in the zero border are
//     not issued to the tensor pipe): one ldmatrix.x4 (matrices: rows oh / oh + 1 x k 0-7 / 8-15; lanes whose
//     image or input row is outside point at the zero row), then two HMMA per block ob with d = kc - ob in the
//     group.
// No barrier after the staging; the epilogue stores the fp32 accumulators (+ bias) as T, two adjacent columns
// per 32-bit store where the output allows it.
// ------------------------------------------------------------------------------------------------
constexpr int TM_FO = 22;       // filter-row offset: a q_j word reads kw in [-22, 16 * DG * ngrp - 1]
constexpr int TM_MAX_K = 64;
constexpr int TM_WARPS = 4;
constexpr int TM_IMG = 8;       // images per CTA: the mma n8 dimension

struct TmLayout {
  int s0, nd, ngrp, nch, xc, rows, ip, fp, z_off, fe_off, fo_off, bytes;  // offsets in elements (2-byte T)
};
__host__ __device__ __forceinline__ int tm_s0(int64_t pl) { return (int)(((-pl) % 8 + 8) % 8); }
__host__ __device__ __forceinline__ TmLayout tm_layout(int KH, int KW, int H, int s0, int NB, int DG, int bm) {
  TmLayout L;
  L.s0 = s0;
  L.nd = (KW + 15 + s0 + 15) / 16;         // Toeplitz offsets d that meet [0, KW)
  L.ngrp = (L.nd + DG - 1) / DG;           // groups of DG offsets (offsets >= nd are all-zero blocks)
  L.nch = NB + L.ngrp * DG - 1;            // 16-column chunks staged per row
  L.xc = 16 * L.nch;
  L.rows = H < bm + KH - 1 ? H : bm + KH - 1;
  L.ip = L.rows * L.xc + 8;                // image pitch: an odd number of 16-B units, so the 8 rows (images)
                                           // of one ldmatrix matrix fall on distinct bank groups
  L.z_off = TM_IMG * L.ip;                 // the zero row (xc elements)
  L.fp = round_up_i(16 * L.ngrp * DG + 24, 8);
  L.fe_off = round_up_i(L.z_off + L.xc, 64);
  L.fo_off = L.fe_off + round_up_i(KH * L.fp, 64) + 32;  // Fo 16 banks from Fe
  L.bytes = (L.fo_off + KH * L.fp) * 2;
  return L;
}

// two fp32 values as one 32-bit word of T (lo in the low half)
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T pr[2] = {Cvt<T>::from_f(lo), Cvt<T>::from_f(hi)};
  uint32_t v;
  memcpy(&v, pr, 4);
  return v;
}
template <typename T, int NB, int DG>
__global__ void __launch_bounds__(32 * TM_WARPS, 2) toeplitz_mma_kernel(ConvArgs a, int vec_x, int bm) {
  constexpr int BN = 16 * NB, NCH = NB + DG - 1, THREADS = 32 * TM_WARPS;
  extern __shared__ __align__(128) unsigned char smem_tm[];
  const int KH = (int)a.KH, KW = (int)a.KW, H = (int)a.H, W = (int)a.W, Ho = (int)a.Ho, Wo = (int)a.Wo;
  const int N = (int)a.N, C = (int)a.C, pt = (int)a.pt;
  const TmLayout L = tm_layout(KH, KW, H, tm_s0(a.pl), NB, DG, bm);
  T* Xs = reinterpret_cast<T*>(smem_tm);
  T* Fe = Xs + L.fe_off;
  T* Fo = Xs + L.fo_off;
  const int c = (int)(blockIdx.x % (unsigned)C);
  const int n0 = (int)(blockIdx.x / (unsigned)C) * TM_IMG;
  const int ow0 = (int)blockIdx.y * BN, oh0 = (int)blockIdx.z * bm;
  const int c0 = ow0 - (int)a.pl - L.s0;   // a multiple of 8
  const int ih_lo = oh0 - pt > 0 ? oh0 - pt : 0;
  const int ih_end = oh0 + bm - 1 - pt + KH;
  const int ih_hi = ih_end < H ? ih_end : H;
  const T* __restrict__ xch = static_cast<const T*>(a.x) + c * a.xs[1];
  const T* __restrict__ wc = static_cast<const T*>(a.w) + c * a.KH * a.KW;
  const T zero = Cvt<T>::from_f(0.f);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  {  // stage x: per image, warp-strided rows, lane-strided vectors (no division); a vector never straddles column 0
    const int ve = vec_x;
    for (int img = 0; img < TM_IMG && n0 + img < N; ++img) {
      const T* xi = xch + (int64_t)(n0 + img) * a.xs[0];
      for (int r = warp; r < ih_hi - ih_lo; r += TM_WARPS) {
        const T* xr = xi + (int64_t)(ih_lo + r) * a.xs[2];
        T* drow = Xs + img * L.ip + r * L.xc;
        for (int j = lane * ve; j < L.xc; j += 32 * ve) {
          const int col = c0 + j;
          const int cnt = (col >= 0 && col < W) ? (W - col < ve ? W - col : ve) : 0;
          if (ve == 1) {
            drow[j] = cnt ? xr[(int64_t)col * a.xs[3]] : zero;
          } else {
            cp_async_zfill(drow + j, cnt ? xr + col : xr, ve * 2, cnt * 2);
          }
        }
      }
    }
    for (int j = threadIdx.x; j < L.xc; j += THREADS) Xs[L.z_off + j] = zero;
    // filter rows, zero-padded by TM_FO on the left and to fp on the right
    for (int kh = warp; kh < KH; kh += TM_WARPS)
      for (int u = lane; u < L.fp; u += 32) {
        const int kw = u - TM_FO;
        Fe[kh * L.fp + u] = (kw >= 0 && kw < KW) ? wc[kh * KW + kw] : zero;
      }
    cp_async_wait_all();
  }
  __syncthreads();
  {  // Fo[kh][u] = Fe[kh][u + 1] (0 at the row end), word-wise
    const uint32_t* fe32 = reinterpret_cast<const uint32_t*>(Fe);
    uint32_t* fo32 = reinterpret_cast<uint32_t*>(Fo);
    const int wpr = L.fp >> 1;
    for (int kh = warp; kh < KH; kh += TM_WARPS)
      for (int k = lane; k < wpr; k += 32) {
        const int w = kh * wpr + k;
        fo32[w] = __byte_perm(fe32[w], k + 1 < wpr ? fe32[w + 1] : 0u, 0x5432);
      }
  }
  __syncthreads();

  const int g4 = lane >> 2, t4 = lane & 3;
  // mma row i <-> output column 2 (i % 8) + i / 8 (interleaved), so the lane's A registers are four distinct words
  // (no register copies) and its C registers hold adjacent output columns.  With x0 = 16 d + 2 t4 - 2 g4 - s0:
  //   a0 = (f[x0], f[x0 + 1]), a1 = (f[x0 - 1], f[x0]), a2 = (f[x0 + 8], ..), a3 = (f[x0 + 7], ..);
  // a pair starting at an even kw index is a word of Fe, at an odd one a word of Fo - 1 (Fo[u] = Fe[u + 1])
  // (as 32-bit word indices into shared memory: pe_w -> (f[x0], ..) of d = 0, po_w -> (f[x0 - 1], ..))
  const uint32_t* S32 = reinterpret_cast<const uint32_t*>(smem_tm);
  const int xoff = 2 * t4 - 2 * g4 - L.s0 + TM_FO;
  const int pe_w = (((L.s0 & 1) ? L.fo_off - 1 : L.fe_off) + xoff) >> 1;      // parity of s0
  const int po_w = (((L.s0 & 1) ? L.fe_off : L.fo_off - 1) + xoff - 1) >> 1;  // the other parity
  // ldmatrix lane roles: matrix lane/8 = (row of the pair lane/16, k half (lane/8)&1), row lane&7 = image
  const int limg = lane & 7, lrow = lane >> 4, lkh = (lane >> 3) & 1;
  const bool limg_ok = n0 + limg < N;
  const uint32_t xs_u32 = smem_u32(Xs);
  const uint32_t zaddr = xs_u32 + (uint32_t)((L.z_off + 8 * lkh) * 2);
  const float bias = a.bias != nullptr ? Cvt<T>::to_f(static_cast<const T*>(a.bias)[c]) : 0.f;
  T* __restrict__ yc = static_cast<T*>(a.y) + c * a.ys[1];
  // two adjacent outputs as one 32-bit word: unit column stride, even row / image strides, 4-byte aligned plane
  // (the lane's first column ow0 + 16 ob + 2 g4 is even)
  const bool pair_store = a.ys[3] == 1 && (a.ys[2] & 1) == 0 && (a.ys[0] & 1) == 0 &&
                          (reinterpret_cast<uintptr_t>(yc) & 3) == 0;
  const int rows_here = Ho - oh0 < bm ? Ho - oh0 : bm;
  const int npairs = (rows_here + 1) >> 1;

  for (int p = warp; p < npairs; p += TM_WARPS) {
    const int oha = oh0 + 2 * p;
    const bool lok = limg_ok && oha + lrow < Ho;
    const int ih0 = oha + lrow - pt;  // this lane's input row at kh = 0
    const uint32_t rbase = xs_u32 + (uint32_t)((limg * L.ip + (ih0 - ih_lo) * L.xc + 8 * lkh) * 2);
    // kernel rows meeting [0, H) for oh = oha or oha + 1
    const int kh_lo = pt - oha - 1 > 0 ? pt - oha - 1 : 0;
    const int kh_end = H + pt - oha;
    const int kh_hi = kh_end < KH ? kh_end : KH;
    float acc[2][NB][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ob = 0; ob < NB; ++ob)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[h][ob][r] = 0.f;

    for (int g = 0; g < L.ngrp; ++g) {
      // chunks DG g + j (j < NCH) meeting the image columns [0, W): one bit each (CTA-uniform)
      uint32_t live = 0;
#pragma unroll
      for (int j = 0; j < NCH; ++j) {
        const int col = c0 + 16 * (DG * g + j);
        if (col + 15 >= 0 && col < W) live |= 1u << j;
      }
      if (live == 0) continue;
      for (int kh = kh_lo; kh < kh_hi; ++kh) {
        const bool ok = lok && (unsigned)(ih0 + kh) < (unsigned)H;
        const uint32_t xa = (ok ? rbase + (uint32_t)(kh * L.xc * 2) : zaddr) + (uint32_t)(32 * DG * g);
        // the DG Toeplitz fragments A_d of this kernel row and group: 4 LDS.32 each, straight into place
        const int aoff = (kh * L.fp + 16 * DG * g) >> 1;  // words (fp is a multiple of 8)
        uint32_t af[DG][4];
#pragma unroll
        for (int dd = 0; dd < DG; ++dd) {
          af[dd][0] = S32[pe_w + aoff + 8 * dd];
          af[dd][1] = S32[po_w + aoff + 8 * dd];
          af[dd][2] = S32[pe_w + aoff + 8 * dd + 4];
          af[dd][3] = S32[po_w + aoff + 8 * dd + 4];
        }
        // per chunk (skipped as a whole, uniformly, when it lies in the zero border): one ldmatrix.x4, then the
        // two products of every (ob, dd = j - ob) of the band
#pragma unroll
        for (int j = 0; j < NCH; ++j) {
          if (!((live >> j) & 1u)) continue;
          uint32_t bf[4];
          ldmatrix_x4(bf, xa + 32 * j);
#pragma unroll
          for (int ob = 0; ob < NB; ++ob) {
            const int dd = j - ob;
            if (dd < 0 || dd >= DG) continue;  // static
            MmaOp<T>::run(acc[0][ob], af[dd], bf[0], bf[1]);
            MmaOp<T>::run(acc[1][ob], af[dd], bf[2], bf[3]);
          }
        }
      }
    }

    // epilogue: lane (g4, t4) holds, per block ob and image 2 t4 + e, the adjacent output columns ow0 + 16 ob + 2 g4
    // and + 1 (C registers e and 2 + e): one 32-bit store where the output allows it, two scalars otherwise
    const int col0 = ow0 + 2 * g4;  // even
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int img = n0 + 2 * t4 + e;
        if (img >= N || oha + h >= Ho) continue;
        T* yr = yc + (int64_t)img * a.ys[0] + (int64_t)(oha + h) * a.ys[2] + (int64_t)col0 * a.ys[3];
#pragma unroll
        for (int ob = 0; ob < NB; ++ob) {
          const int ow = col0 + 16 * ob;
          if (ow >= Wo) continue;
          const float v0 = acc[h][ob][e] + bias, v1 = acc[h][ob][2 + e] + bias;
          if (pair_store && ow + 1 < Wo) {
            *reinterpret_cast<uint32_t*>(yr + 16 * ob) = pack2<T>(v0, v1);
          } else {
            T* q = yr + 16 * ob * a.ys[3];
            q[0] = Cvt<T>::from_f(v0);
            if (ow + 1 < Wo) q[a.ys[3]] = Cvt<T>::from_f(v1);
          }
        }
      }
  }
}

// ------------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------------
namespace {

template <typename T>
void launch_generic(const ConvArgs& a, cudaStream_t stream) {
  const int64_t total = a.N * a.C * a.Ho * a.Wo;
  if (total == 0) return;
  const int threads = 256;
  int64_t blocks = ceil_div(total, threads);
  if (blocks > kMaxGridStrideBlocks) blocks = kMaxGridStrideBlocks;  // grid-stride loop covers the rest
  generic_conv_kernel<T><<<(unsigned)blocks, threads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_grad_input_strided_t(const ConvArgs& a, cudaStream_t stream) {
  const int64_t total = a.N * a.C * a.H * a.W;
  if (total == 0) return;
  const int threads = 256;
  int64_t blocks = ceil_div(total, threads);
  if (blocks > kMaxGridStrideBlocks) blocks = kMaxGridStrideBlocks;
  grad_input_strided_kernel<T><<<(unsigned)blocks, threads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool grid_ok(int64_t gx, int64_t gy, int64_t gz) {
  return gx >= 1 && gx <= kMaxGridX && gy >= 1 && gy <= kMaxGridYZ && gz >= 1 && gz <= kMaxGridYZ;
}

bool try_fp32_blocked(const ConvArgs& a, cudaStream_t stream) {
  if (a.sh != 1 || a.sw != 1 || a.dil_h != 1 || a.dil_w != 1) return false;
  if (a.KH > kMaxFastKernelSide || a.KW > kMaxFastKernelSide) return false;
  const int64_t smem = fp32_smem_bytes(a.KH, a.KW);
  if (smem > a.max_smem_optin) return false;
  const int64_t gx = a.N * a.C, gy = ceil_div(a.Wo, FB_W), gz = ceil_div(a.Ho, FB_H);
  if (!grid_ok(gx, gy, gz)) return false;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(fp32_blocked_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  fp32_blocked_kernel<<<dim3((unsigned)gx, (unsigned)gy, (unsigned)gz), FB_THREADS, (size_t)smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T, int WARPS, int NB>
bool launch_toeplitz_cfg(const ConvArgs& a, cudaStream_t stream) {
  const TcLayout L = tc_layout(a.KH, a.KW, WARPS, NB);
  if (L.total > a.max_smem_optin) return false;
  const int64_t gx = a.N * a.C, gy = ceil_div(a.Wo, 16 * NB), gz = ceil_div(a.Ho, 16 * WARPS);
  if (!grid_ok(gx, gy, gz)) return false;
  if (L.total > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(toeplitz_wmma_kernel<T, WARPS, NB>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L.total));
  }
  toeplitz_wmma_kernel<T, WARPS, NB>
      <<<dim3((unsigned)gx, (unsigned)gy, (unsigned)gz), 32 * WARPS, (size_t)L.total, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// 1 = the small 16 x 16 tile, 0 = the big 64 x 64 tile: whichever computes fewer outputs in total
// (ties -> big, which reuses the Toeplitz blocks over 16 fragments instead of 1)
inline bool toeplitz_small_tile(int64_t Ho, int64_t Wo) {
  const int64_t big = ceil_div(Ho, 64) * 64 * ceil_div(Wo, 64) * 64;
  const int64_t small = ceil_div(Ho, 16) * 16 * ceil_div(Wo, 16) * 16;
  return 2 * small <= big;  // small must save at least half the area to be worth its lower reuse
}

// toeplitz_mma_kernel's configuration: NB = 16-column output blocks per CTA (2 for Wo <= 32, else 4, tiles of
// 64 columns), DG = Toeplitz offsets per group (3 where nd is 3, 5 or 6, else 2: the fewest all-zero offsets)
struct TmConfig {
  int nb, dg;
};
inline TmConfig toeplitz_mma_config(int64_t Wo, int64_t KW, int64_t pl) {
  const int nd = (int)((KW + 15 + tm_s0(pl) + 15) / 16);
  return TmConfig{Wo <= 32 ? 2 : 4, (nd == 3 || nd >= 5) ? 3 : 2};
}

// output rows per CTA: all of them (rounded up to even) if the tile's shared memory is at most half the
// device's per-block limit (two CTAs per SM), else halved until it is; 0 if not even 2 rows fit
inline int toeplitz_mma_rows(const ConvArgs& a, int nb, int dg) {
  const int s0 = tm_s0(a.pl);
  auto bytes = [&](int bm) { return tm_layout((int)a.KH, (int)a.KW, (int)a.H, s0, nb, dg, bm).bytes; };
  int bm = (int)round_up_i((int)a.Ho, 2);
  while (bm > 2 && bytes(bm) > a.max_smem_optin / 2) bm = round_up_i(bm / 2, 2);
  return bytes(bm) <= a.max_smem_optin ? bm : 0;
}

template <typename T, int NB, int DG>
bool launch_toeplitz_mma_cfg(const ConvArgs& a, cudaStream_t stream) {
  const int bm = toeplitz_mma_rows(a, NB, DG);
  if (bm == 0) return false;
  const TmLayout L = tm_layout((int)a.KH, (int)a.KW, (int)a.H, tm_s0(a.pl), NB, DG, bm);
  const int64_t gx = a.C * ceil_div(a.N, TM_IMG), gy = ceil_div(a.Wo, 16 * NB), gz = ceil_div(a.Ho, bm);
  if (!grid_ok(gx, gy, gz)) return false;
  const int vec_x = vec_elems(a.x, a.xs, 2, a.sm_major);  // c0 is a multiple of 8 >= any vector width
  if (L.bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(toeplitz_mma_kernel<T, NB, DG>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        L.bytes));
  }
  toeplitz_mma_kernel<T, NB, DG>
      <<<dim3((unsigned)gx, (unsigned)gy, (unsigned)gz), 32 * TM_WARPS, (size_t)L.bytes, stream>>>(a, vec_x, bm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// the image-rows kernel indexes with 32-bit ints: sizes and paddings below 2^30 (else the wmma/generic path)
inline bool toeplitz_mma_fits(const ConvArgs& a) {
  const int64_t lim = int64_t(1) << 30;
  return a.N < lim && a.C < lim && a.H < lim && a.W < lim && a.Ho < lim && a.Wo < lim && a.pt < lim && a.pt > -lim &&
         a.pl < lim && a.pl > -lim;
}

template <typename T>
bool try_toeplitz(const ConvArgs& a, cudaStream_t stream) {
  if (a.sm_major < 8) return false;  // kernel body is compiled for sm80+ only
  if (a.sh != 1 || a.sw != 1 || a.dil_h != 1 || a.dil_w != 1) return false;
  if (a.KH <= TM_MAX_K && a.KW <= TM_MAX_K && toeplitz_mma_fits(a)) {  // raw mma.sync kernel, image-rows tiling
    const TmConfig t = toeplitz_mma_config(a.Wo, a.KW, a.pl);
    const bool ok = t.nb == 2 ? (t.dg == 3 ? launch_toeplitz_mma_cfg<T, 2, 3>(a, stream) : launch_toeplitz_mma_cfg<T, 2, 2>(a, stream))
                              : (t.dg == 3 ? launch_toeplitz_mma_cfg<T, 4, 3>(a, stream) : launch_toeplitz_mma_cfg<T, 4, 2>(a, stream));
    if (ok) return true;
  }
  if (a.KH > kMaxFastKernelSide || a.KW > kMaxFastKernelSide) return false;
  if (toeplitz_small_tile(a.Ho, a.Wo)) return launch_toeplitz_cfg<T, 1, 1>(a, stream);
  // the big tile's shared memory may exceed the device's limit where the small one still fits
  return launch_toeplitz_cfg<T, 4, 4>(a, stream) || launch_toeplitz_cfg<T, 1, 1>(a, stream);
}

}  // namespace

void launch_forward(const ConvArgs& a, bool force_generic, cudaStream_t stream) {
  if (a.N * a.C * a.Ho * a.Wo == 0) return;
  // both planes <= 256 pixels: the batch-as-rows GEMM (dwconv_small_plane.cu), every dtype and geometry (fp32 with
  // a.allow_tf32: on TF32 tensor cores)
  if (!force_generic && try_small_plane_forward(a, false, stream)) return;
  switch (a.dtype) {
    case DType::kFloat32:
      // TF32 allowed: toeplitz_tf32_kernel (dwconv_toeplitz_tf32.cu); else / where it does not apply the IEEE
      // register-blocked fp32_rb_kernel (dwconv_forward_fp32.cu), fp32_blocked_kernel where that does not apply
      if (!force_generic && (try_toeplitz_tf32(a, stream) || try_fp32_rb(a, stream) || try_fp32_blocked(a, stream)))
        return;
      launch_generic<float>(a, stream);
      return;
    case DType::kFloat16:
      if (!force_generic && try_toeplitz<__half>(a, stream)) return;
      launch_generic<__half>(a, stream);
      return;
    case DType::kBFloat16:
      if (!force_generic && try_toeplitz<__nv_bfloat16>(a, stream)) return;
      launch_generic<__nv_bfloat16>(a, stream);
      return;
  }
  TORCH_CHECK(false, "lkconv_cuda: unsupported dtype code ", (int)a.dtype, " (float32, float16, bfloat16 only)");
}

void launch_grad_input_strided(const ConvArgs& a, bool force_generic, cudaStream_t stream) {
  if (a.N * a.C * a.H * a.W == 0) return;
  // small planes: dX = dY . F_c^T (dwconv_small_plane.cu)
  if (!force_generic && try_small_plane_forward(a, true, stream)) return;
  switch (a.dtype) {
    case DType::kFloat32: launch_grad_input_strided_t<float>(a, stream); return;
    case DType::kFloat16: launch_grad_input_strided_t<__half>(a, stream); return;
    case DType::kBFloat16: launch_grad_input_strided_t<__nv_bfloat16>(a, stream); return;
  }
  TORCH_CHECK(false, "lkconv_cuda: unsupported dtype code ", (int)a.dtype, " (float32, float16, bfloat16 only)");
}

}  // namespace lkconv
