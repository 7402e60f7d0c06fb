// lkconv CUDA backend: grad_weight.
//
//   dW[c, kh, kw] = sum_{n, oh, ow} x[n, c, oh*sh - pt + kh*dil_h, ow*sw - pl + kw*dil_w] * g[n, c, oh, ow]
//
// Always deterministic (no atomics): a split kernel writes fp32 partials partial[s, c, tap], then
// grad_weight_reduce_kernel sums the splits in split order and casts once.  The split count depends only on
// the shapes (grad_weight_splits), so results are bitwise reproducible.  Split kernels:
//
//  * grad_weight_tc_kernel (fp16/bf16, sm80+) and grad_weight_ffma_kernel (fp32): stride 1, dilation 1,
//    KH, KW <= 64 (grad_weight_fast).  Grid (C, splits); CTA (c, s) reduces the output rows
//    rho = n*Ho + oh in [s*chunk, (s+1)*chunk).  Per batch of GWT_RB consecutive output rows of one image
//    and per window of GWT_QW input columns q it stages, once, in shared memory
//        Xs[r][j] = x[n, c, oh0 - pt + r, qa + j]          (zero outside the image)
//        Ge[i][v] = g[n, c, oh0 + i, gal + v]              (zero outside [0, Wo)),  Go[i][v] = Ge[i][v + 1]
//    with gal = the gbase = qa + pl - KWP rounded down to the vector width (delta = gbase - gal), and every
//    tap reuses them:  dW[kh, kw] += sum_{i, j} Xs[i + kh][j] * G[i][j + KWP - kw]  (G[u] = Ge[u + delta]).
//    As a GEMM per output row i: M = kernel rows (A = Xs rows i + kh, row-major, ldmatrix), N = kernel
//    columns (B[j][kw] = G[j + KWP - kw], a Toeplitz of one grad_out row: each lane builds its B registers
//    with 32-bit loads from Ge or, for odd offsets, from the one-element-shifted copy Go), K = the image
//    columns; the K loop runs over the rows of the batch and the 16-wide column chunks, so every MMA
//    accumulates several output rows.  Taps are covered in 32 x 32 tap groups (KWP = 32*ceil(KW/32)); the 4
//    warps take (tap group, output rows i = wr mod WPG); at the end the warps of a tap group are summed in
//    warp order through shared memory.  Staging: cp.async of 4/8/16 bytes with src-size zero-fill where
//    the tensor's alignment and unit column stride allow it (vec_x / vec_g), scalar loads otherwise.
//    fp32 uses the same staging with a register block of 4 kernel rows (kh = khb + 8a) x 8 kernel
//    columns per lane and a 15-value sliding window of the grad_out row (unrolled by 8: no moves); the image's
//    last 1-4 columns of a window take half a step (4 columns, 11 values: 28 x 28 planes end there).
//  * grad_weight_partial_kernel (everything else, and algo=1): its 256 threads form P tap slots x L lanes
//    (P = min(taps, 256), L = 256 / P); a thread sums its tap over r = (n, oh, ow) = lane, lane+L, ... of its
//    split in fp32, then lane partials are added in lane order.
// Mirrored by csrc/kernel_emulation.py (emulate_grad_weight_fast, emulate_grad_weight).
#include <cuda_runtime.h>
#include <type_traits>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "dwconv_launch.h"
#include "dwconv_convert.cuh"
#include "dwconv_mma.cuh"
#include "dwconv_small_plane.h"
#include "dwconv_small_plane_gw_rows.h"

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


// ------------------------------------------------------------------------------------------------
// fast path: staged rows, tensor cores (fp16/bf16) or register-blocked FFMA (fp32)
// ------------------------------------------------------------------------------------------------
constexpr int GWT_RB = 16;       // output rows per staged batch
constexpr int GWT_QW = 64;       // input columns per staged window (2^6)
constexpr int GWT_QW_LOG2 = 6;
constexpr int GWT_WARPS = 4;
constexpr int GWT_THREADS = 32 * GWT_WARPS;
constexpr int GWT_MAX_K = 64;    // KH, KW of the fast path (at most 2 x 2 tap groups of 32 x 32)

struct GwtLayout {
  int xr, xp, gp_log2, ge_off, go_off, bytes;  // offsets in elements of T
};

// tc: the tensor-core kernel (2-byte T, pitch 72 = 144 B: ldmatrix rows on 8 distinct 16-B bank groups,
// plus the shifted copy Go, 16 banks away from Ge); else the fp32 kernel (pitch 68: its 8 lanes' rows
// kh = khb + 8a land on 8 distinct 16-B bank groups for LDS.128)
__host__ __device__ __forceinline__ GwtLayout gwt_layout(int KH, int KW, int esz, bool tc) {
  GwtLayout L;
  const int kh32 = round_up_i(KH, 32), kw32 = round_up_i(KW, 32);
  L.xr = GWT_RB + kh32 - 1;
  L.xp = tc ? GWT_QW + 8 : GWT_QW + 4;
  L.gp_log2 = (GWT_QW + kw32 + 8 <= 128) ? 7 : 8;
  const int gp = 1 << L.gp_log2;
  L.ge_off = round_up_i(L.xr * L.xp, 64);
  L.go_off = tc ? L.ge_off + round_up_i(GWT_RB * gp, 64) + 32 : L.ge_off + GWT_RB * gp;
  const int total = tc ? L.go_off + GWT_RB * gp : L.go_off;
  const int red = GWT_WARPS * 32 * 32 * 4;  // the epilogue's fp32 buffer aliases the staging area
  L.bytes = total * esz > red ? total * esz : red;
  return L;
}

// staged x columns per window: the next power of two >= the 16-wide chunks the compute reads (16, 32, 64)
__device__ __forceinline__ int gwt_xw_log2(int64_t cols_left) {
  return cols_left > 32 ? 6 : cols_left > 16 ? 5 : 4;
}

// staged grad_out columns per window: a power of two >= xw + KWP + 8 (the B reads of the last chunk, the
// vector alignment shift delta < 8 and the pair's second element), at most the row pitch 2^gp_log2
__device__ __forceinline__ int gwt_gw_log2(int xw_log2, int KWP) {
  const int need = (1 << xw_log2) + KWP + 8;
  return need <= 64 ? 6 : need <= 128 ? 7 : 8;
}

// Stage Xs (all L.xr rows) and Ge (rows < nr) for one (batch, column window); lv = log2(vector elements).
template <typename T>
__device__ __forceinline__ void gwt_stage(const GradWeightArgs& a, const GwtLayout& L, T* Xs, T* Ge,
                                          const T* __restrict__ xc, const T* __restrict__ gc, int64_t n, int64_t oh0,
                                          int nr, int xrows, int xw_log2, int gw_log2, int64_t qa, int64_t gal,
                                          int lvx, int lvg) {
  const T zero = Cvt<T>::from_f(0.f);
  const int tid = threadIdx.x;
  {  // x: rows r < xrows, columns j < 2^xw_log2 (what the compute reads), vectors of 2^lvx columns starting
     // at qa + jv (qa and jv multiples of the vector width)
    const int vpr_log2 = xw_log2 - lvx, ve = 1 << lvx;
    const int total = xrows << vpr_log2;
    const T* xn = xc + n * a.xs[0];
    for (int e = tid; e < total; e += GWT_THREADS) {
      const int r = e >> vpr_log2;
      const int jv = (e & ((1 << vpr_log2) - 1)) << lvx;
      const int64_t ih = oh0 - a.pt + r, q = qa + jv;
      int cnt = 0;
      if (ih >= 0 && ih < a.H && q < a.W) cnt = (int)((a.W - q) < ve ? (a.W - q) : ve);
      T* dst = Xs + r * L.xp + jv;
      if (ve == 1) {
        *dst = cnt ? xn[ih * a.xs[2] + q * a.xs[3]] : zero;
      } else {
        const T* src = cnt ? xn + ih * a.xs[2] + q : xn;
        cp_async_zfill(dst, src, ve * (int)sizeof(T), cnt * (int)sizeof(T));
      }
    }
  }
  {  // grad_out: rows i < nr, columns v < 2^gw_log2 (what the compute reads), vectors at column gal + v (gal a
     // multiple of the vector width: a vector never straddles column 0, only the right edge Wo, which the
     // zero-fill of the tail handles)
    const int vpr_log2 = gw_log2 - lvg, ve = 1 << lvg;
    const int total = nr << vpr_log2;
    const T* gn = gc + n * a.gs[0];
    for (int e = tid; e < total; e += GWT_THREADS) {
      const int i = e >> vpr_log2;
      const int v = (e & ((1 << vpr_log2) - 1)) << lvg;
      const int64_t col = gal + v, oh = oh0 + i;
      int cnt = 0;
      if (col >= 0 && col < a.Wo) cnt = (int)((a.Wo - col) < ve ? (a.Wo - col) : ve);
      T* dst = Ge + (i << L.gp_log2) + v;
      if (ve == 1) {
        *dst = cnt ? gn[oh * a.gs[2] + col * a.gs[3]] : zero;
      } else {
        const T* src = cnt ? gn + oh * a.gs[2] + col : gn;
        cp_async_zfill(dst, src, ve * (int)sizeof(T), cnt * (int)sizeof(T));
      }
    }
  }
  cp_async_wait_all();
}

// The warps of tap group tg are tg*WPG .. tg*WPG + WPG-1; red[warp][32][32] holds each warp's sums.
__device__ __forceinline__ void gwt_epilogue(const GradWeightArgs& a, const float* red, int TWg, int TG, int WPG) {
  const int taps = (int)(a.KH * a.KW);
  float* part = a.partial + ((int64_t)blockIdx.y * a.C + blockIdx.x) * taps;
  for (int e = threadIdx.x; e < TG * 1024; e += GWT_THREADS) {
    const int tgi = e >> 10, row = (e >> 5) & 31, col = e & 31;
    const int kh = 32 * (tgi / TWg) + row, kw = 32 * (tgi % TWg) + col;
    if (kh < a.KH && kw < a.KW) {
      float sum = 0.f;
      for (int w2 = 0; w2 < WPG; ++w2) sum += red[((tgi * WPG + w2) * 32 + row) * 32 + col];  // warp order
      part[kh * a.KW + kw] = sum;
    }
  }
}

// The MMAs of one warp for one staged (batch, window): output rows i = wr, wr + WPG, ... < nr, 16-wide column
// chunks qc < nq, MB A tiles (kernel rows khg + 16*mt + 0..15) x NB B tiles (kernel columns kwg + 8*nt + 0..7).
// a_base: this lane's ldmatrix address for row i = 0, chunk 0, tile 0; brow0 + v0: its B pair for row 0,
// chunk 0, tile 0 (Ge or Go - 1 by parity).
template <typename T, int MB, int NB>
__device__ __forceinline__ void gwt_tc_rows(float (&acc)[2][4][4], uint32_t a_base, const T* brow0, int v0,
                                            const GwtLayout& L, int wr, int WPG, int nr, int nq) {
  for (int i = wr; i < nr; i += WPG) {
    const uint32_t a_row_addr = a_base + (uint32_t)(i * L.xp * (int)sizeof(T));
    const T* brow = brow0 + (i << L.gp_log2) + v0;
    for (int qc = 0; qc < nq; ++qc) {
      uint32_t af[MB][4];
#pragma unroll
      for (int mt = 0; mt < MB; ++mt)
        ldmatrix_x4(af[mt], a_row_addr + (uint32_t)((16 * mt * L.xp + 16 * qc) * (int)sizeof(T)));
#pragma unroll
      for (int nt = 0; nt < NB; ++nt) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(brow + 16 * qc - 8 * nt);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(brow + 16 * qc - 8 * nt + 8);
#pragma unroll
        for (int mt = 0; mt < MB; ++mt) MmaOp<T>::run(acc[mt][nt], af[mt], b0, b1);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(GWT_THREADS) grad_weight_tc_kernel(GradWeightArgs a) {
  extern __shared__ __align__(16) unsigned char gwt_smem[];
  const int KH = (int)a.KH, KW = (int)a.KW;
  const GwtLayout L = gwt_layout(KH, KW, (int)sizeof(T), true);
  T* Xs = reinterpret_cast<T*>(gwt_smem);
  T* Ge = Xs + L.ge_off;
  T* Go = Xs + L.go_off;
  const int gp = 1 << L.gp_log2;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t c = blockIdx.x, s = blockIdx.y;
  const int64_t NHo = a.N * a.Ho;
  const int64_t chunk = ceil_div(NHo, a.splits);
  const int64_t rho0 = s * chunk, rho1 = (rho0 + chunk < NHo) ? rho0 + chunk : NHo;
  const int TWg = (KW + 31) / 32, TG = ((KH + 31) / 32) * TWg;
  const int WPG = GWT_WARPS / TG;  // TG is 1, 2 or 4
  const int tg = warp / WPG, wr = warp % WPG;
  const int khg = 32 * (tg / TWg), kwg = 32 * (tg % TWg);
  const int KWP = 32 * TWg;
  const int g4 = lane >> 2, t4 = lane & 3;
  const int a_row = lane & 15, a_col = (lane >> 4) * 8;  // ldmatrix.x4 lane address: row, column in the 16x16 tile
  const T* __restrict__ xc = static_cast<const T*>(a.x) + c * a.xs[1];
  const T* __restrict__ gc = static_cast<const T*>(a.g) + c * a.gs[1];
  const int lvx = a.vec_x == 8 ? 3 : a.vec_x == 4 ? 2 : a.vec_x == 2 ? 1 : 0;
  const int lvg = a.vec_g == 8 ? 3 : a.vec_g == 4 ? 2 : a.vec_g == 2 ? 1 : 0;
  const uint32_t xs_base = smem_u32(Xs);

  float acc[2][4][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;

  for (int64_t rho = rho0; rho < rho1;) {
    const int64_t n = rho / a.Ho, oh0 = rho - n * a.Ho;  // one division per batch
    int64_t left = rho1 - rho;
    if (a.Ho - oh0 < left) left = a.Ho - oh0;
    const int nr = left < GWT_RB ? (int)left : GWT_RB;
    for (int64_t qa = 0; qa < a.W; qa += GWT_QW) {
      const int64_t gbase = qa + a.pl - KWP;
      const int64_t gal = floor_div(gbase, a.vec_g) * a.vec_g;
      const int delta = (int)(gbase - gal);
      // rows read: i + kh for kh < 16*ceil(KH/16) (whole 16-row A tiles)
      const int xw_log2 = gwt_xw_log2(a.W - qa), gw_log2 = gwt_gw_log2(xw_log2, KWP);
      gwt_stage<T>(a, L, Xs, Ge, xc, gc, n, oh0, nr, nr + round_up_i(KH, 16) - 1, xw_log2, gw_log2, qa, gal, lvx, lvg);
      __syncthreads();
      {  // Go[i][v] = Ge[i][v + 1] for v < 2^gw_log2 (0 at the staged end), a 32-bit word (two elements) at a time
        const uint32_t* ge32 = reinterpret_cast<const uint32_t*>(Ge);
        uint32_t* go32 = reinterpret_cast<uint32_t*>(Go);
        const int wlog = gw_log2 - 1, wpr = 1 << wlog;  // staged words per row
        for (int e = tid; e < (nr << wlog); e += GWT_THREADS) {
          const int k = e & (wpr - 1), w = ((e >> wlog) << (L.gp_log2 - 1)) + k;
          const uint32_t w1 = k + 1 < wpr ? ge32[w + 1] : 0u;
          go32[w] = __byte_perm(ge32[w], w1, 0x5432);  // (high half of word w, low half of word w + 1)
        }
      }
      __syncthreads();
      // this lane's B pairs (G[u], G[u+1]) start at v = u + delta; parity(v) = parity(delta + g4) is fixed
      // per lane: even -> 32-bit word at Ge[v], odd -> at Go[v - 1]
      const bool odd = ((delta + g4) & 1) != 0;
      const T* brow0 = odd ? Go - 1 : Ge;
      const int v0 = 2 * t4 + KWP - kwg - g4 + delta;
      const int64_t cols = a.W - qa;
      const int nq = cols >= GWT_QW ? GWT_QW / 16 : (int)((cols + 15) / 16);  // 16-wide chunks inside the image
      const uint32_t a_base = xs_base + (uint32_t)(((khg + a_row) * L.xp + a_col) * (int)sizeof(T));
      // the tap tiles this warp's group has (16-row A tiles, 8-column B tiles): warp-uniform, dispatched once
      const int mb = khg + 16 < KH ? 2 : 1;
      const int nb = (KW - kwg) >= 32 ? 4 : (KW - kwg + 7) / 8;
      switch (mb * 8 + nb) {
        case 9: gwt_tc_rows<T, 1, 1>(acc, a_base, brow0, v0, L, wr, WPG, nr, nq); break;
        case 10: gwt_tc_rows<T, 1, 2>(acc, a_base, brow0, v0, L, wr, WPG, nr, nq); break;
        case 11: gwt_tc_rows<T, 1, 3>(acc, a_base, brow0, v0, L, wr, WPG, nr, nq); break;
        case 12: gwt_tc_rows<T, 1, 4>(acc, a_base, brow0, v0, L, wr, WPG, nr, nq); break;
        case 17: gwt_tc_rows<T, 2, 1>(acc, a_base, brow0, v0, L, wr, WPG, nr, nq); break;
        case 18: gwt_tc_rows<T, 2, 2>(acc, a_base, brow0, v0, L, wr, WPG, nr, nq); break;
        case 19: gwt_tc_rows<T, 2, 3>(acc, a_base, brow0, v0, L, wr, WPG, nr, nq); break;
        default: gwt_tc_rows<T, 2, 4>(acc, a_base, brow0, v0, L, wr, WPG, nr, nq); break;
      }
      __syncthreads();
    }
    rho += nr;
  }
  // epilogue: C fragment (row g4 [+8], columns 2*t4, 2*t4 + 1) -> red[warp][kh - khg][kw - kwg]
  float* red = reinterpret_cast<float*>(gwt_smem);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        red[(warp * 32 + 16 * mt + g4 + 8 * (r >> 1)) * 32 + 8 * nt + 2 * t4 + (r & 1)] = acc[mt][nt][r];
  __syncthreads();
  gwt_epilogue(a, red, TWg, TG, WPG);
}

__global__ void __launch_bounds__(GWT_THREADS, 1) grad_weight_ffma_kernel(GradWeightArgs a) {
  extern __shared__ __align__(16) unsigned char gwt_smem[];
  const int KH = (int)a.KH, KW = (int)a.KW;
  const GwtLayout L = gwt_layout(KH, KW, 4, false);
  float* Xs = reinterpret_cast<float*>(gwt_smem);
  float* Ge = Xs + L.ge_off;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t c = blockIdx.x, s = blockIdx.y;
  const int64_t NHo = a.N * a.Ho;
  const int64_t chunk = ceil_div(NHo, a.splits);
  const int64_t rho0 = s * chunk, rho1 = (rho0 + chunk < NHo) ? rho0 + chunk : NHo;
  const int TWg = (KW + 31) / 32, TG = ((KH + 31) / 32) * TWg;
  const int WPG = GWT_WARPS / TG;
  const int tg = warp / WPG, wr = warp % WPG;
  const int khg = 32 * (tg / TWg), kwg = 32 * (tg % TWg);
  const int KWP = 32 * TWg;
  const int khb = lane >> 2, kwb = lane & 3;  // taps kh = khg + khb + 8a, kw = kwg + 8*kwb + b
  const float* __restrict__ xc = static_cast<const float*>(a.x) + c * a.xs[1];
  const float* __restrict__ gc = static_cast<const float*>(a.g) + c * a.gs[1];
  const int lvx = a.vec_x == 4 ? 2 : a.vec_x == 2 ? 1 : 0;
  const int lvg = a.vec_g == 4 ? 2 : a.vec_g == 2 ? 1 : 0;

  float acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int b = 0; b < 8; ++b) acc[i][b] = 0.f;

  for (int64_t rho = rho0; rho < rho1;) {
    const int64_t n = rho / a.Ho, oh0 = rho - n * a.Ho;
    int64_t left = rho1 - rho;
    if (a.Ho - oh0 < left) left = a.Ho - oh0;
    const int nr = left < GWT_RB ? (int)left : GWT_RB;
    for (int64_t qa = 0; qa < a.W; qa += GWT_QW) {
      const int64_t gbase = qa + a.pl - KWP;
      const int64_t gal = floor_div(gbase, a.vec_g) * a.vec_g;
      const int delta = (int)(gbase - gal);
      // rows read: i + khg + khb + 8a <= i + 32*ceil(KH/32) - 1
      const int xw_log2 = gwt_xw_log2(a.W - qa), gw_log2 = gwt_gw_log2(xw_log2, KWP);
      gwt_stage<float>(a, L, Xs, Ge, xc, gc, n, oh0, nr, nr + round_up_i(KH, 32) - 1, xw_log2, gw_log2, qa, gal, lvx,
                       lvg);
      __syncthreads();
      const int wcols = (int)(a.W - qa < GWT_QW ? a.W - qa : GWT_QW);  // image columns of this window
      for (int i = wr; i < nr; i += WPG) {
        const float* grow = Ge + (i << L.gp_log2) + KWP - kwg - 8 * kwb - 7 + delta;
        const float* xrow = Xs + (i + khg + khb) * L.xp;
        // full 8-column steps while more than 4 image columns are left, then (1-4 left) half a step: 4 columns,
        // 11 values (x columns j0 + 4 .. j0 + 7 are zero there)
        const int jfull = wcols > 4 ? 8 * ((wcols - 4 + 7) / 8) : 0;
        for (int j0 = 0; j0 < jfull; j0 += 8) {
          float wv[15];  // G[u] for u = j0 + KWP - kwg - 8*kwb - 7 + m: tap b at column j0 + jj is wv[jj + 7 - b]
#pragma unroll
          for (int m = 0; m < 15; ++m) wv[m] = grow[j0 + m];
#pragma unroll
          for (int ai = 0; ai < 4; ++ai) {
            const float4 x0 = *reinterpret_cast<const float4*>(xrow + 8 * ai * L.xp + j0);
            const float4 x1 = *reinterpret_cast<const float4*>(xrow + 8 * ai * L.xp + j0 + 4);
            const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
            for (int jj = 0; jj < 8; ++jj)
#pragma unroll
              for (int b = 0; b < 8; ++b) acc[ai][b] = fmaf(xv[jj], wv[jj + 7 - b], acc[ai][b]);
          }
        }
        if (jfull < wcols) {
          const int j0 = jfull;
          float wv[11];
#pragma unroll
          for (int m = 0; m < 11; ++m) wv[m] = grow[j0 + m];
#pragma unroll
          for (int ai = 0; ai < 4; ++ai) {
            const float4 x0 = *reinterpret_cast<const float4*>(xrow + 8 * ai * L.xp + j0);
            const float xv[4] = {x0.x, x0.y, x0.z, x0.w};
#pragma unroll
            for (int jj = 0; jj < 4; ++jj)
#pragma unroll
              for (int b = 0; b < 8; ++b) acc[ai][b] = fmaf(xv[jj], wv[jj + 7 - b], acc[ai][b]);
          }
        }
      }
      __syncthreads();
    }
    rho += nr;
  }
  float* red = reinterpret_cast<float*>(gwt_smem);
#pragma unroll
  for (int ai = 0; ai < 4; ++ai)
#pragma unroll
    for (int b = 0; b < 8; ++b) red[(warp * 32 + khb + 8 * ai) * 32 + 8 * kwb + b] = acc[ai][b];
  __syncthreads();
  gwt_epilogue(a, red, TWg, TG, WPG);
}

// the fast path covers stride 1, dilation 1, KH, KW <= 64; fp16/bf16 need sm80+ (mma.sync, cp.async)
bool grad_weight_fast(const GradWeightArgs& a) {
  if (a.sh != 1 || a.sw != 1 || a.dil_h != 1 || a.dil_w != 1) return false;
  if (a.KH > GWT_MAX_K || a.KW > GWT_MAX_K || a.N * a.Ho * a.Wo == 0) return false;
  if (a.C > kMaxGridX) return false;
  if (a.dtype != DType::kFloat32 && a.sm_major < 8) return false;
  const int esz = a.dtype == DType::kFloat32 ? 4 : 2;
  return gwt_layout((int)a.KH, (int)a.KW, esz, a.dtype != DType::kFloat32).bytes <= 48 * 1024;
}

int64_t grad_weight_splits(const GradWeightArgs& a, bool force_generic) {
  if (!force_generic) {  // small planes: the row-pair kernel's batch groups, else the batch-as-rows kernel's
    const int64_t r = gw_rows_splits(a);  // pixel blocks x batch groups (dwconv_small_plane.cu)
    if (r > 0) return r;
    const int64_t s = small_plane_grad_weight_splits(a);
    if (s > 0) return s;
  }
  if (!force_generic && grad_weight_fast(a)) {
    // rows of (n, oh) per split >= 64 (4 staged batches), at most ~1024 CTAs in all, at most 1024 splits
    int64_t s = ceil_div(a.N * a.Ho, 64);
    const int64_t by_c = ceil_div(1024, a.C > 0 ? a.C : 1);
    if (s > by_c) s = by_c;
    if (s > 1024) s = 1024;
    return s < 1 ? 1 : s;
  }
  // ~2048 positions per CTA at least, at most 1024 splits, and no more CTAs than needed for ~2k total
  const int64_t R = a.N * a.Ho * a.Wo;
  int64_t s = ceil_div(R, 2048);
  const int64_t want_ctas = 2048;
  const int64_t by_c = ceil_div(want_ctas, a.C > 0 ? a.C : 1);
  if (s > by_c) s = by_c;
  if (s > 1024) s = 1024;  // (so also within kMaxGridYZ, the grid y dimension)
  if (s < 1) s = 1;
  return s;
}

namespace {
template <typename T>
void launch_grad_weight_t(const GradWeightArgs& a, bool force_generic, cudaStream_t stream) {
  const int64_t total = a.C * a.KH * a.KW;
  if (total == 0) return;
  TORCH_CHECK(a.C <= kMaxGridX && a.splits >= 1 && a.splits <= kMaxGridYZ,
              "lkconv_cuda: grad_weight grid out of range (C=", a.C, ", splits=", a.splits, ")");
  TORCH_CHECK(a.splits == grad_weight_splits(a, force_generic),
              "lkconv_cuda: grad_weight workspace split count does not match grad_weight_splits");
  if (a.N * a.Ho * a.Wo > 0) {
    const dim3 grid((unsigned)a.C, (unsigned)a.splits);
    if (!force_generic && gw_rows_applies(a)) {
      launch_gw_rows(a, stream);
    } else if (!force_generic && small_plane_grad_weight_splits(a) > 0) {
      launch_small_plane_grad_weight(a, stream);
    } else if (!force_generic && grad_weight_fast(a)) {
      const bool tc = a.dtype != DType::kFloat32;
      const size_t smem = (size_t)gwt_layout((int)a.KH, (int)a.KW, (int)sizeof(T), tc).bytes;  // <= 48 KB
      if constexpr (std::is_same<T, float>::value) {
        grad_weight_ffma_kernel<<<grid, GWT_THREADS, smem, stream>>>(a);
      } else {
        grad_weight_tc_kernel<T><<<grid, GWT_THREADS, smem, stream>>>(a);
      }
    } else {
      grad_weight_partial_kernel<T><<<grid, GW_THREADS, 0, stream>>>(a);
    }
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

void fill_grad_weight_vectors(GradWeightArgs& a) {
  const int esz = a.dtype == DType::kFloat32 ? 4 : 2;
  a.vec_x = vec_elems(a.x, a.xs, esz, a.sm_major);
  a.vec_g = vec_elems(a.g, a.gs, esz, a.sm_major);
}

void launch_grad_weight(const GradWeightArgs& a, bool force_generic, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: launch_grad_weight_t<float>(a, force_generic, stream); return;
    case DType::kFloat16: launch_grad_weight_t<__half>(a, force_generic, stream); return;
    case DType::kBFloat16: launch_grad_weight_t<__nv_bfloat16>(a, force_generic, stream); return;
  }
  TORCH_CHECK(false, "lkconv_cuda: unsupported dtype code ", (int)a.dtype, " (float32, float16, bfloat16 only)");
}

}  // namespace lkconv
