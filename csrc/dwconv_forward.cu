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
//                            accumulate), Toeplitz B fragments formed per lane from the filter rows.
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
// stride 1, dilation 1, KH, KW <= 64).  CTA = WARPS warps = (16*WARPS) x (8*NT) outputs of one (n, c).
// Staged once: Xs[r][j] = x[n, c, oh0 - pt + r, c0 + j] (c0 = ow0 - pl rounded down to 8, s0 = ow0 - pl - c0;
// zero outside the image; cp.async vectors where aligned), the filter rows Fe[kh][u] = f[kh, u - TM_FO]
// (zero outside [0, KW)) and their one-element-shifted copy Fo[kh][u] = Fe[kh][u + 1].  Per kernel row kh
// and 16-column chunk kc each warp loads its A tile (rows 16*warp + kh, columns 16*kc) once with
// ldmatrix.x4 and multiplies it by every 8-column Toeplitz block nt of the band:
//   B[k][n] = f[kh, 16*kc - 8*nt - s0 + k - n],
// whose lane registers are 32-bit pairs read from Fe or Fo - 1 (by the parity of s0 + lane/4).  No Toeplitz
// block is materialised and there is no barrier inside the kh loop.
// ------------------------------------------------------------------------------------------------
constexpr int TM_FO = 22;       // filter-row offset: an in-band B pair reads kw in [-22, KW + 21]
constexpr int TM_MAX_K = 64;

struct TmLayout {
  int rows, xc, xp, fp, fe_off, fo_off, bytes;  // offsets in elements (2-byte T)
};
__host__ __device__ __forceinline__ TmLayout tm_layout(int KH, int KW, int BM, int BN) {
  TmLayout L;
  L.rows = BM + KH - 1;
  L.xc = 16 * ((7 + BN - 1 + KW + 15) / 16);  // columns s0 + [0, BN - 1 + KW) with s0 < 8, whole chunks
  L.xp = L.xc + 8;                            // 16-B units per row odd: ldmatrix rows on distinct bank groups
  L.fp = round_up_i(KW + 2 * TM_FO, 8);
  L.fe_off = round_up_i(L.rows * L.xp, 64);
  L.fo_off = L.fe_off + round_up_i(KH * L.fp, 64) + 32;  // Fo 16 banks from Fe
  L.bytes = (L.fo_off + KH * L.fp) * 2;
  return L;
}

template <typename T, int WARPS, int NT>
__global__ void __launch_bounds__(32 * WARPS) toeplitz_mma_kernel(ConvArgs a, int vec_x) {
  constexpr int BM = 16 * WARPS, BN = 8 * NT, THREADS = 32 * WARPS;
  extern __shared__ __align__(128) unsigned char smem_tm[];
  const int KH = (int)a.KH, KW = (int)a.KW;
  const TmLayout L = tm_layout(KH, KW, BM, BN);
  T* Xs = reinterpret_cast<T*>(smem_tm);
  T* Fe = Xs + L.fe_off;
  T* Fo = Xs + L.fo_off;
  const int64_t nc = blockIdx.x;
  const int64_t n = nc / a.C, c = nc - (nc / a.C) * a.C;
  const int64_t ow0 = (int64_t)blockIdx.y * BN, oh0 = (int64_t)blockIdx.z * BM;
  const int64_t c0 = floor_div(ow0 - a.pl, 8) * 8;
  const int s0 = (int)(ow0 - a.pl - c0);
  const T* __restrict__ xc = static_cast<const T*>(a.x) + n * a.xs[0] + c * a.xs[1];
  const T* __restrict__ wc = static_cast<const T*>(a.w) + c * a.KH * a.KW;
  const T zero = Cvt<T>::from_f(0.f);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  {  // stage x: warp-strided rows, lane-strided vectors (no division); a vector never straddles column 0
    const int ve = vec_x;
    for (int r = warp; r < L.rows; r += WARPS) {
      const int64_t ih = oh0 - a.pt + r;
      const bool row_in = ih >= 0 && ih < a.H;
      for (int j = lane * ve; j < L.xc; j += 32 * ve) {
        const int64_t col = c0 + j;
        int cnt = 0;
        if (row_in && col >= 0 && col < a.W) cnt = (int)((a.W - col) < ve ? (a.W - col) : ve);
        T* dst = Xs + r * L.xp + j;
        if (ve == 1) {
          *dst = cnt ? xc[ih * a.xs[2] + col * a.xs[3]] : zero;
        } else {
          cp_async_zfill(dst, cnt ? xc + ih * a.xs[2] + col : xc, ve * 2, cnt * 2);
        }
      }
    }
    // filter rows, zero-padded by TM_FO on the left
    for (int kh = warp; kh < KH; kh += WARPS)
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
    for (int kh = warp; kh < KH; kh += WARPS)
      for (int k = lane; k < wpr; k += 32) {
        const int w = kh * wpr + k;
        fo32[w] = __byte_perm(fe32[w], k + 1 < wpr ? fe32[w + 1] : 0u, 0x5432);
      }
  }
  __syncthreads();

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[nt][r] = 0.f;

  const int g4 = lane >> 2, t4 = lane & 3;
  const T* bbase = (((s0 + g4) & 1) ? Fo - 1 : Fe) + 2 * t4 - g4 - s0 + TM_FO;  // + kh*fp + 16kc - 8nt
  const uint32_t a_base = smem_u32(Xs) + (uint32_t)((((warp * 16) + (lane & 15)) * L.xp + (lane >> 4) * 8) * 2);
  const int nkc = (s0 + BN - 1 + KW + 15) / 16;
  // kernel rows whose input rows for this warp meet [0, H)
  int64_t kh_lo = a.pt - oh0 - 16 * warp - 15, kh_hi = a.H + a.pt - oh0 - 16 * warp;
  kh_lo = kh_lo < 0 ? 0 : (kh_lo > KH ? KH : kh_lo);
  kh_hi = kh_hi < 0 ? 0 : (kh_hi > KH ? KH : kh_hi);
  // 16-column chunks inside the image
  int64_t kc_lo = floor_div(-c0 - 15 + 15, 16), kc_hi = ceil_div(a.W - c0, 16);
  kc_lo = kc_lo < 0 ? 0 : kc_lo;
  kc_hi = kc_hi > nkc ? nkc : kc_hi;
  const unsigned band = (unsigned)(KW + 21);
  for (int kh = (int)kh_lo; kh < (int)kh_hi; ++kh) {
    const T* brow = bbase + kh * L.fp;
    for (int kc = (int)kc_lo; kc < (int)kc_hi; ++kc) {
      uint32_t af[4];
      ldmatrix_x4(af, a_base + (uint32_t)((kh * L.xp + 16 * kc) * 2));
      const int kw_top = 16 * kc - s0 + 15;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        // band: the block meets [0, KW) iff its largest tap kw_hi = kw_top - 8 nt is in [0, KW + 21]
        if ((unsigned)(kw_top - 8 * nt) > band) continue;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(brow + 16 * kc - 8 * nt);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(brow + 16 * kc - 8 * nt + 8);
        MmaOp<T>::run(acc[nt], af, b0, b1);
      }
    }
  }

  // epilogue: C fragment (row g4 [+8], columns 2*t4, 2*t4 + 1 of block nt); the two columns of a pair are
  // stored as one 32-bit word where the output has unit column stride and even, aligned rows
  const float b = a.bias != nullptr ? Cvt<T>::to_f(static_cast<const T*>(a.bias)[c]) : 0.f;
  T* yc = static_cast<T*>(a.y) + n * a.ys[0] + c * a.ys[1];
  const bool pairs = a.ys[3] == 1 && (a.ys[2] & 1) == 0 && (reinterpret_cast<uintptr_t>(yc) & 3) == 0;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t oh = oh0 + 16 * warp + g4 + 8 * h, ow = ow0 + 8 * nt + 2 * t4;  // ow even
      if (oh >= a.Ho || ow >= a.Wo) continue;
      T* dst = yc + oh * a.ys[2] + ow * a.ys[3];
      const T v0 = Cvt<T>::from_f(acc[nt][2 * h] + b), v1 = Cvt<T>::from_f(acc[nt][2 * h + 1] + b);
      if (pairs && ow + 1 < a.Wo) {
        T pr[2] = {v0, v1};
        *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(pr);
      } else {
        dst[0] = v0;
        if (ow + 1 < a.Wo) dst[a.ys[3]] = v1;
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

template <typename T, int WARPS, int NT>
bool launch_toeplitz_mma_cfg(const ConvArgs& a, cudaStream_t stream) {
  const TmLayout L = tm_layout((int)a.KH, (int)a.KW, 16 * WARPS, 8 * NT);
  // K <= 32: at most 33 KB; larger kernels need the opt-in (64 x 64 tile, K = 64: 67 KB)
  if (L.bytes > a.max_smem_optin) return false;
  const int64_t gx = a.N * a.C, gy = ceil_div(a.Wo, 8 * NT), gz = ceil_div(a.Ho, 16 * WARPS);
  if (!grid_ok(gx, gy, gz)) return false;
  const int vec_x = vec_elems(a.x, a.xs, 2, a.sm_major);  // c0 is a multiple of 8 >= any vector width
  if (L.bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(toeplitz_mma_kernel<T, WARPS, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        L.bytes));
  }
  toeplitz_mma_kernel<T, WARPS, NT>
      <<<dim3((unsigned)gx, (unsigned)gy, (unsigned)gz), 32 * WARPS, (size_t)L.bytes, stream>>>(a, vec_x);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
bool try_toeplitz(const ConvArgs& a, cudaStream_t stream) {
  if (a.sm_major < 8) return false;  // kernel body is compiled for sm80+ only
  if (a.sh != 1 || a.sw != 1 || a.dil_h != 1 || a.dil_w != 1) return false;
  if (a.KH <= TM_MAX_K && a.KW <= TM_MAX_K) {  // raw mma.sync kernel, same tile choice as the wmma one
    // (the big tile's shared memory may exceed the device's limit where the small one still fits)
    if (toeplitz_small_tile(a.Ho, a.Wo) ? launch_toeplitz_mma_cfg<T, 1, 2>(a, stream)
                                        : (launch_toeplitz_mma_cfg<T, 4, 8>(a, stream) ||
                                           launch_toeplitz_mma_cfg<T, 1, 2>(a, stream)))
      return true;
  }
  if (a.KH > kMaxFastKernelSide || a.KW > kMaxFastKernelSide) return false;
  if (toeplitz_small_tile(a.Ho, a.Wo)) return launch_toeplitz_cfg<T, 1, 1>(a, stream);
  // the big tile's shared memory may exceed the device's limit where the small one still fits
  return launch_toeplitz_cfg<T, 4, 4>(a, stream) || launch_toeplitz_cfg<T, 1, 1>(a, stream);
}

}  // namespace

void launch_forward(const ConvArgs& a, bool force_generic, cudaStream_t stream) {
  if (a.N * a.C * a.Ho * a.Wo == 0) return;
  // both planes <= 256 pixels: the batch-as-rows GEMM (dwconv_small_plane.cu), every dtype and geometry
  if (!force_generic && try_small_plane_forward(a, false, stream)) return;
  switch (a.dtype) {
    case DType::kFloat32:
      if (!force_generic && try_fp32_blocked(a, stream)) return;
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
