// lkconv CUDA backend: small planes (both planes of the pass <= 256 pixels), the batch-as-rows GEMM.
//
// Per channel c the convolution is one matrix product with the batch as the M dimension:
//   forward      Y[n, q] = sum_p X[n, p] F_c[p, q]            (P = H*W input pixels, Q = Ho*Wo output pixels)
//   grad_input   dX[n, p] = sum_q dY[n, q] F_c[p, q]           (the same F_c, transposed: any stride)
//   grad_weight  G[p, q] = sum_n X[n, p] dY[n, q];  dW[c, kh, kw] = sum of G[p, q] over the pairs of tap (kh, kw)
// with F_c[p, q] = w[c, kh, kw] for p = (oh*sh - pt + kh*dil_h, ow*sw - pl + kw*dil_w), q = (oh, ow) (zero
// elsewhere; a pair has at most one tap).  Any stride, padding (negative too) and dilation is exact in this form.
//
//   small_plane_mma_kernel<T, TRANS>   fp16/bf16, sm80+.  CTA (c, q-block, batch group), 8 warps.  Shared memory:
//       Bs[qq][k]  = F_c for the CTA's QB columns (TRANS: rows), row-major over the GEMM K index, pitch kp + 8
//                    (kp = P rounded up to 16; an odd number of 16-byte units: ldmatrix rows hit distinct banks),
//                    built ONCE per CTA: zero-fill, then every (output pixel, kernel row) of the block scatters
//                    the filter taps that land in the image;
//       Xs[m][k]   = 64 batch rows of the pass input (16-byte / 8 / 4-byte cp.async with zero-fill where the
//                    plane is contiguous and aligned, else a per-element gather: channels_last, strided views);
//       Fs         = the filter of channel c.
//     Warp item = 32 batch rows x 32 columns (2 x 4 m16n8 tiles): per 16-wide K step 2 ldmatrix.x4 for A
//     (Xs), 2 ldmatrix.x4 for B (Bs rows = n, 16 contiguous k: the "col" B fragment), 8 mma.sync.m16n8k16
//     (fp32 accumulate).  Epilogue straight from the C fragments: (g, 2t..2t+1) pairs are adjacent pixels,
//     stored as one 32-bit word where the output plane is contiguous and the word aligned.
//   small_plane_mma_kernel<float, TRANS>  fp32 with TF32 allowed (ConvArgs::allow_tf32), sm80+: the same kernel on
//       TF32 tensor cores (mma.sync.m16n8k8): 4-byte layout sp_layout_tf32 (kp = P rounded up to 8, pitch kp + 4
//       floats: again an odd number of 16-byte units), the same byte addressing (a 32-byte k16 step of 16-bit data
//       is one k8 step of floats, and ldmatrix.x4 on float rows yields the m16n8k8 A and B fragments), F_c and X
//       rounded to TF32 once (cvt.rna: the filter when staged, X in place by the lane that staged it), 64-bit pair
//       stores.
//   small_plane_ffma_kernel<TRANS>     fp32 (IEEE).  Same F_c, stored k-major (Bs[k][qq]) for 128-bit loads;
//       Xs[k][m] (32 batch rows, pitch 36); each thread a 4 (batch) x 8 (pixel) register block: per k one
//       LDS.128 of X, two LDS.128 of F_c, 32 FFMA.
//   small_plane_gw_mma_kernel<T> / small_plane_gw_ffma_kernel   grad_weight: CTA (c, split = q-block x batch
//       group); G for the block accumulated over the group's batch chunks in fp32 shared memory (tensor cores:
//       A = X^T and B = dY, both ldmatrix.trans from row-major staged rows; fp32: 4 x 8 register block), then
//       every tap sums its pairs in a fixed order into partial[split, c, tap].  grad_weight_reduce_kernel
//       (dwconv_grad_weight.cu) adds the splits in split order: deterministic, no atomics.
// Mirrored by csrc/kernel_emulation.py (section "small planes").
#include <cuda_runtime.h>
#include <type_traits>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "dwconv_small_plane.h"
#include "dwconv_convert.cuh"
#include "dwconv_mma.cuh"

namespace lkconv {

constexpr int SP_THREADS = 256, SP_WARPS = 8;
constexpr int SP_MB_TC = 64;   // batch rows per staged chunk, 16-bit kernels
constexpr int SP_MB_F32 = 32;  // fp32 kernels
constexpr int SP_XP_F32 = SP_MB_F32 + 4;  // fp32 forward Xs[k][m] pitch (16-byte rows, 4-way bank spread)
constexpr int SP_MAX_GEOM = 1024;      // stride and dilation (int32 index math in the F_c build)
constexpr int SP_MAX_PAD = 65536;      // |padding|

// plan of one launch: GEMM sizes, pixel block, batch groups (shared by the host and the kernels)
struct SpPlan {
  int P, Q;          // GEMM K-dim pixels (plane read), N-dim pixels (plane written); grad_weight: x, grad_out planes
  int QB;            // N-dim pixels per CTA (multiple of 8)
  int qsplits;       // ceil(Q / QB)
  int bgroups;       // batch groups
  int64_t cpg;       // batch chunks per group
  int64_t nchunks;   // batch chunks in all
  int bytes;         // dynamic shared memory
};

struct SpLayout {
  int kp, pitch, qr, bs_off, fs_off, bytes;  // element counts; offsets/bytes in bytes
};

// fp16/bf16 forward: Xs[64][pitch], Bs[qr][pitch], Fs[taps], Fo[taps]
__host__ __device__ inline SpLayout sp_layout_tc(int P, int QB, int taps) {
  SpLayout L;
  L.kp = round_up_i(P, 16);
  L.pitch = L.kp + 8;
  L.qr = round_up_i(QB, 16);
  L.bs_off = SP_MB_TC * L.pitch * 2;
  L.fs_off = L.bs_off + L.qr * L.pitch * 2;
  L.bytes = L.fs_off + 2 * round_up_i(taps * 2, 16);  // Fs, then Fo (Fs shifted by one element)
  return L;
}
// fp32 forward on TF32 tensor cores: Xs[64][pitch], Bs[qr][pitch] floats, Fs[taps], Fo[taps] (Fo unused)
__host__ __device__ inline SpLayout sp_layout_tf32(int P, int QB, int taps) {
  SpLayout L;
  L.kp = round_up_i(P, 8);
  L.pitch = L.kp + 4;
  L.qr = round_up_i(QB, 16);
  L.bs_off = SP_MB_TC * L.pitch * 4;
  L.fs_off = L.bs_off + L.qr * L.pitch * 4;
  L.bytes = L.fs_off + 2 * round_up_i(taps * 4, 16);
  return L;
}
// fp32 forward: Xs[P][36], Bs[P][qr] (qr = QB rounded up to 8), Fs[taps]
__host__ __device__ inline SpLayout sp_layout_f32(int P, int QB, int taps) {
  SpLayout L;
  L.kp = P;
  L.pitch = SP_XP_F32;
  L.qr = round_up_i(QB, 8);
  L.bs_off = P * SP_XP_F32 * 4;
  L.fs_off = L.bs_off + P * L.qr * 4;
  L.bytes = L.fs_off + round_up_i(taps * 4, 16);
  return L;
}

struct SpGwLayout {
  int xp, yp, gp, grows, ys_off, gs_off, bytes;  // pitches in elements; offsets/bytes in bytes
};
// grad_weight: Xs[MB][xp], Ys[MB][yp] (T), Gs[grows][gp] fp32
__host__ __device__ inline SpGwLayout sp_gw_layout(int P, int QB, bool tc) {
  SpGwLayout L;
  if (tc) {
    L.grows = round_up_i(P, 16);
    L.xp = L.grows + 8;                 // odd number of 16-byte units: conflict-free ldmatrix.trans
    L.yp = round_up_i(QB, 16) + 8;
    L.gp = round_up_i(QB, 16) + 8;      // 8 mod 16 words: the float2 C-fragment stores are conflict-free
    L.ys_off = SP_MB_TC * L.xp * 2;
    L.gs_off = round_up_i(L.ys_off + SP_MB_TC * L.yp * 2, 16);
  } else {
    L.grows = round_up_i(P, 4);
    L.xp = L.grows;
    L.yp = round_up_i(QB, 8);
    L.gp = L.yp;
    L.ys_off = SP_MB_F32 * L.xp * 4;
    L.gs_off = L.ys_off + SP_MB_F32 * L.yp * 4;
  }
  L.bytes = L.gs_off + L.grows * L.gp * 4;
  return L;
}

__device__ __forceinline__ int fdiv_i(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }  // b > 0

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t addr) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------------
// F_c build: B[nidx * sn + kidx * sk] = w[kh, kw] for every (output pixel q, kernel row kh) of the block and
// every tap kw whose input pixel p lies in the image.  !TRANS: nidx = q - q0 (q in the CTA's block), kidx = p.
// TRANS: nidx = p - q0 (p in the block), kidx = q (every q).  B is zero elsewhere (zero-filled before).
// ------------------------------------------------------------------------------------------------
// kw range [x, y) of an output pixel when dil_w > 1 (iw = iw0 + kw * dw in [0, W)); divisions, out of line
__device__ __noinline__ int2 sp_kw_range_dilated(int iw0, int W, int dw) {
  const int kw_lo = iw0 < 0 ? (-iw0 + dw - 1) / dw : 0;
  const int kw_hi = W - 1 - iw0 < 0 ? 0 : (W - 1 - iw0) / dw + 1;
  return make_int2(kw_lo, kw_hi);
}
// TRANS: the kw sub-range whose pixel p = pbase + kw * dw lies in [q0, q0 + qn)
__device__ __noinline__ int2 sp_kw_clip_dilated(int pbase, int dw, int q0, int qn) {
  return make_int2(fdiv_i(q0 - pbase + dw - 1, dw), fdiv_i(q0 + qn - 1 - pbase, dw) + 1);
}

// ------------------------------------------------------------------------------------------------
// F_c build: B[nidx * sn + kidx * sk] = w[kh, kw] for every output pixel q of the walk and every tap whose
// input pixel p = (oh*sh - pt + kh*dh, ow*sw - pl + kw*dw) lies in the image.  !TRANS: nidx = q - q0 (q in the
// CTA's block), kidx = p.  TRANS: nidx = p - q0 (p in the block), kidx = q (every q).  B is zero elsewhere
// (zero-filled before).  Thread t -> (pixel qi = t mod nq, kernel-row group t / nq of ceil(KH / kg) rows,
// kg = 256 / nq groups): one division per thread, the kw range once per pixel, per kernel row one contiguous
// run of taps.  PAIRS (16-bit !TRANS, sk == 1, dw == 1): the run is copied as 32-bit words, from Fs or from
// its one-element-shifted copy Fo (Fo[i] = Fs[i + 1]) so that source and destination words are aligned.
// ------------------------------------------------------------------------------------------------
template <typename T, bool TRANS, bool PAIRS>
__device__ __forceinline__ void sp_build_fc(T* B, int sn, int sk, const T* Fs, const T* Fo, const ConvArgs& a, int q0,
                                            int qn) {
  const int KH = (int)a.KH, KW = (int)a.KW, H = (int)a.H, W = (int)a.W, Wo = (int)a.Wo;
  const int sh = (int)a.sh, sw = (int)a.sw, dh = (int)a.dil_h, dw = (int)a.dil_w, pt = (int)a.pt, pl = (int)a.pl;
  const int nq = TRANS ? (int)(a.Ho * a.Wo) : qn;  // <= SP_MAX_PIX = SP_THREADS
  const int qs = TRANS ? 0 : q0;
  const int kg = SP_THREADS / nq;
  const int khper = (KH + kg - 1) / kg;
  const int t = threadIdx.x;
  if (t >= nq * kg) return;
  const int g = t / nq, qi = t - g * nq;
  const int q = qs + qi, oh = q / Wo, ow = q - oh * Wo;
  const int iw0 = ow * sw - pl;  // iw = iw0 + kw * dw
  int kw_lo, kw_hi;
  if (dw == 1) {
    kw_lo = -iw0 > 0 ? -iw0 : 0;
    kw_hi = W - iw0;
  } else {
    const int2 r = sp_kw_range_dilated(iw0, W, dw);
    kw_lo = r.x;
    kw_hi = r.y;
  }
  kw_hi = kw_hi < KW ? kw_hi : KW;
  if (kw_lo >= kw_hi) return;
  int kh_lo = g * khper, kh_hi = kh_lo + khper < KH ? kh_lo + khper : KH;
  const int ih0 = oh * sh - pt;  // ih = ih0 + kh * dh
  if (dh == 1) {
    kh_lo = -ih0 > kh_lo ? -ih0 : kh_lo;
    kh_hi = H - ih0 < kh_hi ? H - ih0 : kh_hi;
  }
  for (int kh = kh_lo; kh < kh_hi; ++kh) {
    const int ih = ih0 + kh * dh;
    if (dh != 1 && (ih < 0 || ih >= H)) continue;
    const int pbase = ih * W + iw0;  // p = pbase + kw * dw
    const T* f = Fs + kh * KW;
    if (!TRANS) {
      if (PAIRS) {
        T* dst = B + qi * sn + pbase + kw_lo;
        const int n = kw_hi - kw_lo;
        int i = 0;
        if (reinterpret_cast<uintptr_t>(dst) & 2) {
          dst[0] = f[kw_lo];
          i = 1;
        }
        const int s = kh * KW + kw_lo + i;
        const uint32_t* src32 = reinterpret_cast<const uint32_t*>((s & 1) ? Fo + s - 1 : Fs + s);
        uint32_t* d32 = reinterpret_cast<uint32_t*>(dst + i);
        const int np = (n - i) >> 1;
        for (int k = 0; k < np; ++k) d32[k] = src32[k];
        if ((n - i) & 1) dst[n - 1] = f[kw_hi - 1];
      } else {
        T* dst = B + qi * sn;
        for (int kw = kw_lo, p = pbase + kw_lo * dw; kw < kw_hi; ++kw, p += dw) dst[p * sk] = f[kw];
      }
    } else {  // p in [q0, q0 + qn)
      int lo = kw_lo, hi = kw_hi;
      if (dw == 1) {
        lo = q0 - pbase > lo ? q0 - pbase : lo;
        hi = q0 + qn - pbase < hi ? q0 + qn - pbase : hi;
      } else {
        const int2 r = sp_kw_clip_dilated(pbase, dw, q0, qn);
        lo = r.x > lo ? r.x : lo;
        hi = r.y < hi ? r.y : hi;
      }
      T* dst = B + q * sk;
      for (int kw = lo, p = pbase + lo * dw - q0; kw < hi; ++kw, p += dw) dst[p * sn] = f[kw];
    }
  }
}

// element `pix` of a non-contiguous plane (channels_last, strided views): out of line, off the flat path
template <typename T>
__device__ __noinline__ T sp_gather(const T* src, int pix, int pw, int64_t s2, int64_t s3) {
  const int ih = pix / pw;
  return src[ih * s2 + (pix - ih * pw) * s3];
}

// stage `rows` batch rows of a plane into S[m * pitch + j], j in [0, width): pixel pix0 + j for j < cnt and
// m < rows_valid, zero elsewhere.  ve > 1: cp.async of ve elements (flat contiguous plane, aligned; the
// host checked); else element loads (flat: offset = pixel; else (pixel / pw, pixel % pw) by strides s2, s3).
// SPLIT: the flat element path in a loop of its own (the forward kernels keep one loop: a separate one makes
// ptxas spill there, measured-static).
template <typename T, bool SPLIT = false>
__device__ __forceinline__ void sp_stage(T* S, int pitch, int width, const T* base, int64_t s_row, int rows,
                                         int rows_valid, int pix0, int cnt, bool flat, int pw, int64_t s2,
                                         int64_t s3, int ve) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T zero = Cvt<T>::from_f(0.f);
  for (int m = warp; m < rows; m += SP_WARPS) {
    const T* src = base + (int64_t)m * s_row;
    T* dst = S + m * pitch;
    const bool rv = m < rows_valid;
    if (ve > 1) {
      for (int j = lane * ve; j < width; j += 32 * ve) {
        int n = rv ? cnt - j : 0;
        n = n < 0 ? 0 : (n > ve ? ve : n);
        cp_async_zfill(dst + j, n ? src + pix0 + j : base, ve * (int)sizeof(T), n * (int)sizeof(T));
      }
    } else if (SPLIT && flat) {  // the flat plane's own loop (grad_weight kernels: no call in it)
      const T* sp = src + pix0;
      const int c = rv ? cnt : 0;
      for (int j = lane; j < width; j += 32) dst[j] = j < c ? sp[j] : zero;
    } else {
      for (int j = lane; j < width; j += 32) {
        T v = zero;
        if (rv && j < cnt) v = flat ? src[pix0 + j] : sp_gather<T>(src, pix0 + j, pw, s2, s3);
        dst[j] = v;
      }
    }
  }
}

// output element (n row base yrow, pixel q) of a plane of width pw
template <typename T>
__device__ __forceinline__ void sp_store(T* yrow, bool flat, int pw, int64_t s2, int64_t s3, int q, float v) {
  if (flat) {
    yrow[q] = Cvt<T>::from_f(v);
  } else {
    const int oh = q / pw;
    yrow[oh * s2 + (q - oh * pw) * s3] = Cvt<T>::from_f(v);
  }
}

// the general epilogue (unaligned or non-contiguous output planes): out of line, so the hot item loop
// carries only the aligned 32-bit pair path.  v[2 nt + e] goes to pixel q0 + qq + 8 nt + e (qq + 8 nt + e < qn).
template <typename T>
__device__ __noinline__ void sp_store_pairs(T* yrow, bool flat, int pw, int64_t s2, int64_t s3, int q0, int qq, int qn,
                                            const float* v) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (qq + 8 * nt + e < qn) sp_store<T>(yrow, flat, pw, s2, s3, q0 + qq + 8 * nt + e, v[2 * nt + e]);
}

// fp32 general epilogue, out of line: v[j] to pixel q + j for j < left
__device__ __noinline__ void sp_store_run8(float* yrow, bool flat, int pw, int64_t s2, int64_t s3, int q, int left,
                                           const float* v) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < left) sp_store<float>(yrow, flat, pw, s2, s3, q + j, v[j]);
}

// one warp item: acc[mt][nt] (32 rows x 32 columns of 2 x 4 m16n8 tiles) over ksteps 16-wide K steps.
// A tile mt of step ks at abase + mt * a_m1 + ks * a_step, B tiles (2p, 2p + 1) at bbase + p * b_n1 + ks * b_step
// (lane offsets included); LDT: ldmatrix.trans (operands staged K-major).  FULL: both m16 tiles and all four
// n8 tiles live, no conditionals in the K loop.
template <typename T, bool FULL, bool LDT>
__device__ __forceinline__ void sp_mma_item(float (&acc)[2][4][4], uint32_t abase, uint32_t a_step, uint32_t a_m1,
                                            uint32_t bbase, uint32_t b_step, uint32_t b_n1, int ksteps, bool mt1,
                                            int ntv) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
#pragma unroll 2
  for (int ks = 0; ks < ksteps; ++ks) {
    uint32_t af[2][4], bf[4][2], r4[4];
    const uint32_t ao = abase + ks * a_step, bo = bbase + ks * b_step;
    if (LDT) ldmatrix_x4_trans(af[0], ao); else ldmatrix_x4(af[0], ao);
    if (FULL || mt1) {
      if (LDT) ldmatrix_x4_trans(af[1], ao + a_m1); else ldmatrix_x4(af[1], ao + a_m1);
    }
    if (LDT) ldmatrix_x4_trans(r4, bo); else ldmatrix_x4(r4, bo);
    bf[0][0] = r4[0]; bf[0][1] = r4[1]; bf[1][0] = r4[2]; bf[1][1] = r4[3];
    if (FULL || ntv > 2) {
      if (LDT) ldmatrix_x4_trans(r4, bo + b_n1); else ldmatrix_x4(r4, bo + b_n1);
      bf[2][0] = r4[0]; bf[2][1] = r4[1]; bf[3][0] = r4[2]; bf[3][1] = r4[3];
    } else {
      bf[2][0] = bf[2][1] = bf[3][0] = bf[3][1] = 0u;
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      if (!FULL && nt >= ntv) continue;
      MmaOp<T>::run(acc[0][nt], af[0], bf[nt][0], bf[nt][1]);
      if (FULL || mt1) MmaOp<T>::run(acc[1][nt], af[1], bf[nt][0], bf[nt][1]);
    }
  }
}

// two adjacent outputs as one store (T pair: 32-bit word; float pair: 64-bit), p aligned to 2 * sizeof(T)
template <typename T>
__device__ __forceinline__ void sp_store2(T* p, float v0, float v1) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  } else {
    T pr[2] = {Cvt<T>::from_f(v0), Cvt<T>::from_f(v1)};
    *reinterpret_cast<uint32_t*>(p) = *reinterpret_cast<const uint32_t*>(pr);
  }
}

// TF32 (T = float): round the elements this lane staged with sp_stage (same rows, columns and vector width), in
// place, after its cp.async.wait (its own copies are visible to it; no other lane's element is touched)
__device__ __forceinline__ void sp_round_tf32_own(float* S, int pitch, int width, int rows, int ve) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int m = warp; m < rows; m += SP_WARPS) {
    float* dst = S + m * pitch;
    if (ve == 4) {
      for (int j = lane * 4; j < width; j += 128) {
        float4 v = *reinterpret_cast<float4*>(dst + j);
        v.x = to_tf32(v.x); v.y = to_tf32(v.y); v.z = to_tf32(v.z); v.w = to_tf32(v.w);
        *reinterpret_cast<float4*>(dst + j) = v;
      }
    } else if (ve == 2) {
      for (int j = lane * 2; j < width; j += 64) {
        float2 v = *reinterpret_cast<float2*>(dst + j);
        v.x = to_tf32(v.x); v.y = to_tf32(v.y);
        *reinterpret_cast<float2*>(dst + j) = v;
      }
    } else {
      for (int j = lane; j < width; j += 32) dst[j] = to_tf32(dst[j]);
    }
  }
}

// one forward warp item: the GEMM (sp_mma_item) and its epilogue (FULL: all 32 rows and 32 pixels live, the plane
// contiguous and every row's pairs 32-bit aligned: nothing but the pair stores).  Rows r < rows of the item are batch rows
// (ybase + r * s_n), columns qq in [0, 32) are pixels q0 + nb0 + qq (< qn).  C fragment: c0, c1 = (row g4,
// pixels 2t4, 2t4 + 1), c2, c3 = row g4 + 8; a pair goes out as one 32-bit word where the plane is contiguous
// and the word aligned, else through sp_store_pairs.
template <typename T, bool FULL>
__device__ __forceinline__ void sp_fwd_item(uint32_t abase, uint32_t bbase, int rowb, int ksteps, bool mt1, int ntv,
                                            T* ybase, int64_t s_n, bool yflat, int nW, int64_t s2, int64_t s3, int q0,
                                            int nb0, int qn, int rows, float bias) {
  float acc[2][4][4];
  const uint32_t m1 = 16 * rowb;
  sp_mma_item<T, FULL, false>(acc, abase, 32, m1, bbase, 32, m1, ksteps, mt1, ntv);
  const int lane = threadIdx.x & 31, g4 = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = mt * 16 + g4 + 8 * h;
      T* yrow = ybase + m * s_n;
      if (FULL) {  // the caller checked: contiguous plane, every row's pixel pairs 32-bit aligned
        T* yq = yrow + q0 + nb0 + 2 * t4;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) sp_store2<T>(yq + 8 * nt, acc[mt][nt][2 * h] + bias, acc[mt][nt][2 * h + 1] + bias);
        continue;
      }
      if (m >= rows) continue;
      if (yflat && (reinterpret_cast<uintptr_t>(yrow + q0) & (2 * sizeof(T) - 1)) == 0) {  // q0, qq even: pairs
        T* yq = yrow + q0 + nb0 + 2 * t4;
        const int left = qn - nb0 - 2 * t4;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          if (8 * nt + 1 < left) {
            sp_store2<T>(yq + 8 * nt, acc[mt][nt][2 * h] + bias, acc[mt][nt][2 * h + 1] + bias);
          } else if (8 * nt < left) {
            yq[8 * nt] = Cvt<T>::from_f(acc[mt][nt][2 * h] + bias);
          }
        }
      } else {
        float v[8];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          v[2 * nt] = acc[mt][nt][2 * h] + bias;
          v[2 * nt + 1] = acc[mt][nt][2 * h + 1] + bias;
        }
        sp_store_pairs<T>(yrow, yflat, nW, s2, s3, q0, nb0 + 2 * t4, qn, v);
      }
    }
}

// items with a dead m16 tile or fewer than four n8 tiles (the last pixel block / batch rows): out of line
template <typename T>
__device__ __noinline__ void sp_fwd_item_partial(uint32_t abase, uint32_t bbase, int rowb, int ksteps, bool mt1,
                                                 int ntv, T* ybase, int64_t s_n, bool yflat, int nW, int64_t s2,
                                                 int64_t s3, int q0, int nb0, int qn, int rows, float bias) {
  sp_fwd_item<T, false>(abase, bbase, rowb, ksteps, mt1, ntv, ybase, s_n, yflat, nW, s2, s3, q0, nb0, qn, rows, bias);
}

// ------------------------------------------------------------------------------------------------
// forward / grad_input, fp16/bf16
// ------------------------------------------------------------------------------------------------
template <typename T, bool TRANS>
__global__ void __launch_bounds__(SP_THREADS) small_plane_mma_kernel(ConvArgs a, SpPlan pl, int vec_x) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  extern __shared__ __align__(128) unsigned char smem_sp[];
  const int KH = (int)a.KH, KW = (int)a.KW, taps = KH * KW;
  constexpr bool TF32 = sizeof(T) == 4;  // float: TF32 tensor cores
  const SpLayout L = TF32 ? sp_layout_tf32(pl.P, pl.QB, taps) : sp_layout_tc(pl.P, pl.QB, taps);
  T* Xs = reinterpret_cast<T*>(smem_sp);
  T* Bs = reinterpret_cast<T*>(smem_sp + L.bs_off);
  T* Fs = reinterpret_cast<T*>(smem_sp + L.fs_off);
  const int64_t c = blockIdx.x;
  const int q0 = (int)blockIdx.y * pl.QB;
  const int qn = pl.Q - q0 < pl.QB ? pl.Q - q0 : pl.QB;
  const T* __restrict__ xg = static_cast<const T*>(a.x);
  const T* __restrict__ wc = static_cast<const T*>(a.w) + c * taps;
  // planes: read (K dim) and written (N dim)
  const int kH = TRANS ? (int)a.Ho : (int)a.H, kW = TRANS ? (int)a.Wo : (int)a.W;
  const int nW = TRANS ? (int)a.W : (int)a.Wo;
  (void)kH;

  T* Fo = Fs + round_up_i(taps, 8);
  for (int e = threadIdx.x; e < taps; e += SP_THREADS) {
    if constexpr (TF32) {
      Fs[e] = to_tf32(wc[e]);  // F_c's values, rounded once
    } else {
      Fs[e] = wc[e];
      Fo[e] = e + 1 < taps ? wc[e + 1] : Cvt<T>::from_f(0.f);
    }
  }
  {
    uint4* bz = reinterpret_cast<uint4*>(Bs);
    const int words = L.qr * L.pitch * (int)sizeof(T) / 16;
    for (int e = threadIdx.x; e < words; e += SP_THREADS) bz[e] = make_uint4(0u, 0u, 0u, 0u);
  }
  __syncthreads();
  if constexpr (!TF32 && !TRANS) {  // ordered before the GEMM by the staging barrier
    if (a.dil_w == 1)
      sp_build_fc<T, TRANS, true>(Bs, L.pitch, 1, Fs, Fo, a, q0, qn);
    else
      sp_build_fc<T, TRANS, false>(Bs, L.pitch, 1, Fs, Fo, a, q0, qn);
  } else {
    sp_build_fc<T, TRANS, false>(Bs, L.pitch, 1, Fs, Fo, a, q0, qn);
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool xflat = a.xs[3] == 1 && a.xs[2] == kW;
  const bool yflat = a.ys[3] == 1 && a.ys[2] == nW;
  // every output row's pixel pairs (q0 + even) 32-bit aligned: the row base of batch row 0 is, and the batch stride is even
  const bool pairs_ok = yflat && (a.ys[0] & 1) == 0 &&
                        (reinterpret_cast<uintptr_t>(static_cast<T*>(a.y) + c * a.ys[1] + q0) & (2 * sizeof(T) - 1)) == 0;
  const float bias = a.bias != nullptr ? Cvt<T>::to_f(static_cast<const T*>(a.bias)[c]) : 0.f;
  const uint32_t xs_u = smem_u32(Xs), bs_u = smem_u32(Bs);
  const int rowb = L.pitch * (int)sizeof(T);  // bytes per smem row
  // ldmatrix lane offsets: A rows (lane & 15), k half (lane >> 4); B rows (tile (lane >> 4), row lane & 7), k half (lane >> 3) & 1
  const uint32_t a_lane = (uint32_t)((lane & 15) * rowb + (lane >> 4) * 16);
  const uint32_t b_lane = (uint32_t)((((lane >> 4) << 3) + (lane & 7)) * rowb + ((lane >> 3) & 1) * 16);
  const int ksteps = L.kp * (int)sizeof(T) / 32;  // 32-byte K steps: k16 (16-bit) or k8 (TF32)
  const int nnb = (qn + 31) / 32;
  const int nitems = (SP_MB_TC / 32) * nnb;
  const int64_t ch0 = (int64_t)blockIdx.z * pl.cpg;
  const int64_t ch1 = ch0 + pl.cpg < pl.nchunks ? ch0 + pl.cpg : pl.nchunks;

  for (int64_t ch = ch0; ch < ch1; ++ch) {
    const int64_t n0 = ch * SP_MB_TC;
    const int rows_valid = a.N - n0 < SP_MB_TC ? (int)(a.N - n0) : SP_MB_TC;
    sp_stage<T>(Xs, L.pitch, L.kp, xg + n0 * a.xs[0] + c * a.xs[1], a.xs[0], SP_MB_TC, rows_valid, 0, pl.P, xflat,
                kW, a.xs[2], a.xs[3], vec_x);
    cp_async_wait_all();
    if constexpr (TF32) sp_round_tf32_own(Xs, L.pitch, L.kp, SP_MB_TC, vec_x);
    __syncthreads();  // Xs staged, Bs built

    for (int item = warp; item < nitems; item += SP_WARPS) {
      const int mb = item & 1, nb = item >> 1;
      if (mb * 32 >= rows_valid) continue;
      const bool mt1 = mb * 32 + 16 < rows_valid;
      const int ntv = (qn - nb * 32 + 7) / 8 < 4 ? (qn - nb * 32 + 7) / 8 : 4;  // live n8 tiles, >= 1
      const uint32_t abase = xs_u + a_lane + (uint32_t)(mb * 32 * rowb);
      const uint32_t bbase = bs_u + b_lane + (uint32_t)(nb * 32 * rowb);
      T* ybase = static_cast<T*>(a.y) + (n0 + mb * 32) * a.ys[0] + c * a.ys[1];
      if (pairs_ok && rows_valid - mb * 32 >= 32 && qn - nb * 32 >= 32)  // every row and pixel live, aligned pairs
        sp_fwd_item<T, true>(abase, bbase, rowb, ksteps, true, 4, ybase, a.ys[0], yflat, nW, a.ys[2], a.ys[3], q0,
                             nb * 32, qn, rows_valid - mb * 32, bias);
      else
        sp_fwd_item_partial<T>(abase, bbase, rowb, ksteps, mt1, ntv, ybase, a.ys[0], yflat, nW, a.ys[2], a.ys[3], q0,
                               nb * 32, qn, rows_valid - mb * 32, bias);
    }
    __syncthreads();  // Xs is restaged next chunk
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// forward / grad_input, fp32 (FFMA)
// ------------------------------------------------------------------------------------------------
template <bool TRANS>
__global__ void __launch_bounds__(SP_THREADS) small_plane_ffma_kernel(ConvArgs a, SpPlan pl) {
  extern __shared__ __align__(128) unsigned char smem_sp[];
  const int KH = (int)a.KH, KW = (int)a.KW, taps = KH * KW;
  const SpLayout L = sp_layout_f32(pl.P, pl.QB, taps);
  float* Xs = reinterpret_cast<float*>(smem_sp);
  float* Bs = reinterpret_cast<float*>(smem_sp + L.bs_off);
  float* Fs = reinterpret_cast<float*>(smem_sp + L.fs_off);
  const int64_t c = blockIdx.x;
  const int q0 = (int)blockIdx.y * pl.QB;
  const int qn = pl.Q - q0 < pl.QB ? pl.Q - q0 : pl.QB;
  const int P = pl.P, qr = L.qr;
  const float* __restrict__ xg = static_cast<const float*>(a.x);
  const float* __restrict__ wc = static_cast<const float*>(a.w) + c * taps;
  const int kW = TRANS ? (int)a.Wo : (int)a.W;
  const int nW = TRANS ? (int)a.W : (int)a.Wo;

  for (int e = threadIdx.x; e < taps; e += SP_THREADS) Fs[e] = __ldg(wc + e);
  {
    float4* bz = reinterpret_cast<float4*>(Bs);
    const int words = P * qr / 4;
    for (int e = threadIdx.x; e < words; e += SP_THREADS) bz[e] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __syncthreads();
  sp_build_fc<float, TRANS, false>(Bs, 1, qr, Fs, Fs, a, q0, qn);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool xflat = a.xs[3] == 1 && a.xs[2] == kW;
  const bool yflat = a.ys[3] == 1 && a.ys[2] == nW;
  const float bias = a.bias != nullptr ? static_cast<const float*>(a.bias)[c] : 0.f;
  const int nitems = 8 * ((qn + 7) / 8);  // (4-row group mg, 8-pixel group qg)
  const int64_t ch0 = (int64_t)blockIdx.z * pl.cpg;
  const int64_t ch1 = ch0 + pl.cpg < pl.nchunks ? ch0 + pl.cpg : pl.nchunks;

  for (int64_t ch = ch0; ch < ch1; ++ch) {
    const int64_t n0 = ch * SP_MB_F32;
    const int rows_valid = a.N - n0 < SP_MB_F32 ? (int)(a.N - n0) : SP_MB_F32;
    // Xs[k][m]: lanes = batch rows (conflict-free stores), warps = pixels
    {
      const float* src = xg + (n0 + lane) * a.xs[0] + c * a.xs[1];
      for (int k = warp; k < P; k += SP_WARPS) {
        float v = 0.f;
        if (lane < rows_valid) v = xflat ? __ldg(src + k) : sp_gather<float>(src, k, kW, a.xs[2], a.xs[3]);
        Xs[k * SP_XP_F32 + lane] = v;
      }
    }
    __syncthreads();

    for (int it = threadIdx.x; it < nitems; it += SP_THREADS) {
      const int mg = it & 7, qg = it >> 3;
      float acc[4][8];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
      const float* xp = Xs + 4 * mg;
      const float* bp = Bs + 8 * qg;
#pragma unroll 4
      for (int k = 0; k < P; ++k) {
        const float4 xv = *reinterpret_cast<const float4*>(xp + k * SP_XP_F32);
        const float4 b0 = *reinterpret_cast<const float4*>(bp + k * qr);
        const float4 b1 = *reinterpret_cast<const float4*>(bp + k * qr + 4);
        const float xa[4] = {xv.x, xv.y, xv.z, xv.w};
        const float ba[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(xa[i], ba[j], acc[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = 4 * mg + i;
        if (m >= rows_valid) continue;
        float* yrow = static_cast<float*>(a.y) + (n0 + m) * a.ys[0] + c * a.ys[1];
        const int qq = 8 * qg, q = q0 + qq;
        if (yflat && qq + 8 <= qn && (reinterpret_cast<uintptr_t>(yrow + q) & 15) == 0) {
          reinterpret_cast<float4*>(yrow + q)[0] =
              make_float4(acc[i][0] + bias, acc[i][1] + bias, acc[i][2] + bias, acc[i][3] + bias);
          reinterpret_cast<float4*>(yrow + q)[1] =
              make_float4(acc[i][4] + bias, acc[i][5] + bias, acc[i][6] + bias, acc[i][7] + bias);
        } else {
          float v[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = acc[i][j] + bias;
          sp_store_run8(yrow, yflat, nW, a.ys[2], a.ys[3], q, qn - qq, v);
        }
      }
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------------
// grad_weight
// ------------------------------------------------------------------------------------------------
// dW partial of this CTA: every tap sums G[p][q - q0] over its pixel pairs with q in the block, in (oh, ow) order
__device__ __forceinline__ void sp_tap_sums(const float* Gs, int gp, const GradWeightArgs& a, int q0, int qn,
                                            float* out) {
  const int KH = (int)a.KH, KW = (int)a.KW, H = (int)a.H, W = (int)a.W, Wo = (int)a.Wo;
  const int sh = (int)a.sh, sw = (int)a.sw, dh = (int)a.dil_h, dw = (int)a.dil_w, pt = (int)a.pt, pl = (int)a.pl;
  const int oh_a = q0 / Wo, oh_b = (q0 + qn - 1) / Wo;
  for (int t = threadIdx.x; t < KH * KW; t += SP_THREADS) {
    const int kh = t / KW, kw = t - kh * KW;
    const int iw0 = kw * dw - pl;  // iw = ow * sw + iw0
    const int ow_lo = iw0 < 0 ? (-iw0 + sw - 1) / sw : 0;
    const int ow_hi = W - 1 - iw0 < 0 ? 0 : (W - 1 - iw0) / sw + 1;
    float s = 0.f;
    for (int oh = oh_a; oh <= oh_b; ++oh) {
      const int ih = oh * sh - pt + kh * dh;
      if (ih < 0 || ih >= H) continue;
      int lo = q0 - oh * Wo, hi = q0 + qn - oh * Wo;
      lo = lo > ow_lo ? lo : ow_lo;
      hi = hi < ow_hi ? hi : ow_hi;
      hi = hi < Wo ? hi : Wo;
      const float* gr = Gs + (ih * W + iw0 + lo * sw) * gp + (oh * Wo + lo - q0);
      const int step = sw * gp + 1;
#pragma unroll 4
      for (int ow = lo; ow < hi; ++ow, gr += step) s += *gr;
    }
    out[t] = s;
  }
}

// one grad_weight warp item: G tile (32 x-pixels x 32 grad_out pixels) = X^T dY over the chunk's K steps, written
// (first chunk) or added to Gs as float2 per C-fragment row pair.  FULL: both m16 tiles, four n8 tiles, first chunk.
template <typename T, bool FULL>
__device__ __forceinline__ void sp_gw_item(uint32_t abase, uint32_t a_step, uint32_t bbase, uint32_t b_step, int ksteps,
                                           bool mt1, int ntv, float* gtile, int gp, bool first) {
  float acc[2][4][4];
  sp_mma_item<T, FULL, true>(acc, abase, a_step, 32, bbase, b_step, 32, ksteps, mt1, ntv);
  const int lane = threadIdx.x & 31, g4 = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    if (!FULL && mt == 1 && !mt1) continue;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      if (!FULL && nt >= ntv) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float2* gp2 = reinterpret_cast<float2*>(gtile + (mt * 16 + g4 + 8 * h) * gp + nt * 8 + 2 * t4);
        float2 v = make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
        if (!FULL && !first) {
          const float2 o = *gp2;
          v.x += o.x;
          v.y += o.y;
        }
        *gp2 = v;
      }
    }
  }
}

// partial items and later batch chunks (accumulating into G): out of line
template <typename T>
__device__ __noinline__ void sp_gw_item_partial(uint32_t abase, uint32_t a_step, uint32_t bbase, uint32_t b_step,
                                                int ksteps, bool mt1, int ntv, float* gtile, int gp, bool first) {
  sp_gw_item<T, false>(abase, a_step, bbase, b_step, ksteps, mt1, ntv, gtile, gp, first);
}

template <typename T>
__global__ void __launch_bounds__(SP_THREADS) small_plane_gw_mma_kernel(GradWeightArgs a, SpPlan pl, int vec_x, int vec_g) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  extern __shared__ __align__(128) unsigned char smem_sp[];
  const SpGwLayout L = sp_gw_layout(pl.P, pl.QB, true);
  T* Xs = reinterpret_cast<T*>(smem_sp);
  T* Ys = reinterpret_cast<T*>(smem_sp + L.ys_off);
  float* Gs = reinterpret_cast<float*>(smem_sp + L.gs_off);
  const int64_t c = blockIdx.x;
  const int split = (int)blockIdx.y, qs = split % pl.qsplits, bg = split / pl.qsplits;
  const int q0 = qs * pl.QB;
  const int qn = pl.Q - q0 < pl.QB ? pl.Q - q0 : pl.QB;
  const int W = (int)a.W, Wo = (int)a.Wo;
  const bool xflat = a.xs[3] == 1 && a.xs[2] == W;
  const bool gflat = a.gs[3] == 1 && a.gs[2] == Wo;
  const T* __restrict__ xg = static_cast<const T*>(a.x);
  const T* __restrict__ gg = static_cast<const T*>(a.g);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint32_t xs_u = smem_u32(Xs), ys_u = smem_u32(Ys);
  // ldmatrix.trans lane rows: A (Xs rows = batch): n half (lane >> 4) & 1, p half (lane >> 3) & 1;
  // B (Ys rows = batch): n half (lane >> 3) & 1, q tile (lane >> 4) & 1
  const uint32_t a_lane = (uint32_t)((((lane >> 4) & 1) * 8 + (lane & 7)) * L.xp * 2 + ((lane >> 3) & 1) * 16);
  const uint32_t b_lane = (uint32_t)((((lane >> 3) & 1) * 8 + (lane & 7)) * L.yp * 2 + ((lane >> 4) & 1) * 16);
  const int nmg = (L.grows + 31) / 32, nnb = (qn + 31) / 32;
  const int64_t ch0 = (int64_t)bg * pl.cpg;
  const int64_t ch1 = ch0 + pl.cpg < pl.nchunks ? ch0 + pl.cpg : pl.nchunks;

  for (int64_t ch = ch0; ch < ch1; ++ch) {
    const int64_t n0 = ch * SP_MB_TC;
    const int rows_valid = a.N - n0 < SP_MB_TC ? (int)(a.N - n0) : SP_MB_TC;
    sp_stage<T, true>(Xs, L.xp, L.grows, xg + n0 * a.xs[0] + c * a.xs[1], a.xs[0], SP_MB_TC, rows_valid, 0, pl.P, xflat, W,
                a.xs[2], a.xs[3], vec_x);
    sp_stage<T, true>(Ys, L.yp, round_up_i(pl.QB, 16), gg + n0 * a.gs[0] + c * a.gs[1], a.gs[0], SP_MB_TC, rows_valid, q0,
                qn, gflat, Wo, a.gs[2], a.gs[3], vec_g);
    cp_async_wait_all();
    __syncthreads();
    const int ksteps = (rows_valid + 15) / 16;
    for (int item = warp; item < nmg * nnb; item += SP_WARPS) {
      const int mb = item % nmg, nb = item / nmg;
      const bool mt1 = mb * 32 + 16 < pl.P;
      const int ntv = (qn - nb * 32 + 7) / 8 < 4 ? (qn - nb * 32 + 7) / 8 : 4;
      const uint32_t abase = xs_u + a_lane + (uint32_t)(mb * 32 * 2);
      const uint32_t bbase = ys_u + b_lane + (uint32_t)(nb * 32 * 2);
      const uint32_t a_step = 16 * L.xp * 2, b_step = 16 * L.yp * 2;
      float* gtile = Gs + (mb * 32) * L.gp + nb * 32;
      if (mt1 && ntv == 4 && ch == ch0)
        sp_gw_item<T, true>(abase, a_step, bbase, b_step, ksteps, true, 4, gtile, L.gp, true);
      else
        sp_gw_item_partial<T>(abase, a_step, bbase, b_step, ksteps, mt1, ntv, gtile, L.gp, ch == ch0);
    }
    __syncthreads();
  }
  sp_tap_sums(Gs, L.gp, a, q0, qn, a.partial + ((int64_t)split * a.C + c) * (a.KH * a.KW));
#endif
}

__global__ void __launch_bounds__(SP_THREADS) small_plane_gw_ffma_kernel(GradWeightArgs a, SpPlan pl, int vec_x, int vec_g) {
  extern __shared__ __align__(128) unsigned char smem_sp[];
  const SpGwLayout L = sp_gw_layout(pl.P, pl.QB, false);
  float* Xs = reinterpret_cast<float*>(smem_sp);
  float* Ys = reinterpret_cast<float*>(smem_sp + L.ys_off);
  float* Gs = reinterpret_cast<float*>(smem_sp + L.gs_off);
  const int64_t c = blockIdx.x;
  const int split = (int)blockIdx.y, qs = split % pl.qsplits, bg = split / pl.qsplits;
  const int q0 = qs * pl.QB;
  const int qn = pl.Q - q0 < pl.QB ? pl.Q - q0 : pl.QB;
  const int W = (int)a.W, Wo = (int)a.Wo;
  const bool xflat = a.xs[3] == 1 && a.xs[2] == W;
  const bool gflat = a.gs[3] == 1 && a.gs[2] == Wo;
  const float* __restrict__ xg = static_cast<const float*>(a.x);
  const float* __restrict__ gg = static_cast<const float*>(a.g);
  const int npg = L.grows / 4, nqg = (qn + 7) / 8;
  const int64_t ch0 = (int64_t)bg * pl.cpg;
  const int64_t ch1 = ch0 + pl.cpg < pl.nchunks ? ch0 + pl.cpg : pl.nchunks;

  for (int64_t ch = ch0; ch < ch1; ++ch) {
    const int64_t n0 = ch * SP_MB_F32;
    const int rows_valid = a.N - n0 < SP_MB_F32 ? (int)(a.N - n0) : SP_MB_F32;
    sp_stage<float, true>(Xs, L.xp, L.grows, xg + n0 * a.xs[0] + c * a.xs[1], a.xs[0], SP_MB_F32, rows_valid, 0, pl.P,
                    xflat, W, a.xs[2], a.xs[3], vec_x);
    sp_stage<float, true>(Ys, L.yp, L.yp, gg + n0 * a.gs[0] + c * a.gs[1], a.gs[0], SP_MB_F32, rows_valid, q0, qn, gflat,
                    Wo, a.gs[2], a.gs[3], vec_g);
    cp_async_wait_all();
    __syncthreads();
    const bool first = ch == ch0;
    for (int it = threadIdx.x; it < npg * nqg; it += SP_THREADS) {
      const int pg = it % npg, qg = it / npg;
      float acc[4][8];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
      const float* xp = Xs + 4 * pg;
      const float* yp = Ys + 8 * qg;
#pragma unroll 4
      for (int n = 0; n < rows_valid; ++n) {
        const float4 xv = *reinterpret_cast<const float4*>(xp + n * L.xp);
        const float4 y0 = *reinterpret_cast<const float4*>(yp + n * L.yp);
        const float4 y1 = *reinterpret_cast<const float4*>(yp + n * L.yp + 4);
        const float xa[4] = {xv.x, xv.y, xv.z, xv.w};
        const float ya[8] = {y0.x, y0.y, y0.z, y0.w, y1.x, y1.y, y1.z, y1.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(xa[i], ya[j], acc[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float4* g4p = reinterpret_cast<float4*>(Gs + (4 * pg + i) * L.gp + 8 * qg);
        float4 v0 = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        float4 v1 = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
        if (!first) {
          const float4 o0 = g4p[0], o1 = g4p[1];
          v0.x += o0.x; v0.y += o0.y; v0.z += o0.z; v0.w += o0.w;
          v1.x += o1.x; v1.y += o1.y; v1.z += o1.z; v1.w += o1.w;
        }
        g4p[0] = v0;
        g4p[1] = v1;
      }
    }
    __syncthreads();
  }
  sp_tap_sums(Gs, L.gp, a, q0, qn, a.partial + ((int64_t)split * a.C + c) * (a.KH * a.KW));
}

// ------------------------------------------------------------------------------------------------
// host side: the rule, the plan, the launches
// ------------------------------------------------------------------------------------------------
namespace {

// forward geometry (H, W) -> (Ho, Wo), kernel KH x KW
bool sp_rule(DType dt, int sm_major, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t KH,
             int64_t KW, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl) {
  if (dt != DType::kFloat32 && sm_major < 8) return false;
  if (N < 1 || C < 1 || C > kMaxGridX) return false;
  if (H * W > SP_MAX_PIX || Ho * Wo > SP_MAX_PIX || H < 1 || W < 1 || Ho < 1 || Wo < 1) return false;
  if (KH * KW > SP_MAX_TAPS) return false;
  if (sh > SP_MAX_GEOM || sw > SP_MAX_GEOM || dh > SP_MAX_GEOM || dw > SP_MAX_GEOM) return false;
  if (pt > SP_MAX_PAD || pt < -SP_MAX_PAD || pl > SP_MAX_PAD || pl < -SP_MAX_PAD) return false;
  const int64_t kh_eff = KH < H ? KH : H, kw_eff = KW < W ? KW : W;
  return kh_eff * kw_eff * 8 >= H * W;  // F_c at least 1/8 dense (else the direct kernels do less work)
}

// kind 0: 16-bit forward, 1: fp32 forward, 2: 16-bit grad_weight, 3: fp32 grad_weight, 4: fp32 forward on TF32
int sp_bytes(int kind, int P, int QB, int taps) {
  switch (kind) {
    case 0: return sp_layout_tc(P, QB, taps).bytes;
    case 4: return sp_layout_tf32(P, QB, taps).bytes;
    case 1: return sp_layout_f32(P, QB, taps).bytes;
    case 2: return sp_gw_layout(P, QB, true).bytes;
    default: return sp_gw_layout(P, QB, false).bytes;
  }
}

// the smallest number of pixel blocks whose CTA fits the budget; batch groups so that the grid has >= ~512 CTAs
bool sp_make_plan(int kind, int P, int Q, int taps, int64_t N, int64_t C, int max_smem_optin, SpPlan& pl) {
  const int budget = max_smem_optin < SP_SMEM_BUDGET ? max_smem_optin : SP_SMEM_BUDGET;
  const int mb = (kind == 0 || kind == 2 || kind == 4) ? SP_MB_TC : SP_MB_F32;
  for (int s = 1; s <= 32; ++s) {
    const int QB = round_up_i((Q + s - 1) / s, 8);
    const int bytes = sp_bytes(kind, P, QB, taps);
    if (bytes > budget) continue;
    pl.P = P;
    pl.Q = Q;
    pl.QB = QB;
    pl.qsplits = (Q + QB - 1) / QB;
    pl.bytes = bytes;
    pl.nchunks = ceil_div(N, mb);
    const int64_t base = C * pl.qsplits;
    int64_t bg = ceil_div(512, base);
    if (bg > pl.nchunks) bg = pl.nchunks;
    if (bg > 1024 / pl.qsplits) bg = 1024 / pl.qsplits;  // grad_weight: at most 1024 splits
    if (bg < 1) bg = 1;
    pl.cpg = ceil_div(pl.nchunks, bg);
    pl.bgroups = (int)ceil_div(pl.nchunks, pl.cpg);
    return true;
  }
  return false;
}

// cp.async width for a flat contiguous plane: base, image and channel strides multiples of the vector
int sp_vec(const void* p, const int64_t* st, int esz, int sm_major) {
  if (sm_major < 8) return 1;
  for (int bytes = 16; bytes >= 4; bytes /= 2) {
    const int ve = bytes / esz;
    if (ve < 2) break;
    if (reinterpret_cast<uintptr_t>(p) % bytes == 0 && st[0] % ve == 0 && st[1] % ve == 0) return ve;
  }
  return 1;
}

template <typename K>
void sp_set_smem(K kernel, int bytes) {
  if (bytes > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// fp32 forward / grad_input on TF32 tensor cores: PyTorch allows TF32 (algo 2) and the device has them
inline bool sp_tf32(const ConvArgs& a) { return a.dtype == DType::kFloat32 && a.allow_tf32 && a.sm_major >= 8; }

template <typename T, bool TRANS>
void sp_launch_forward(const ConvArgs& a, const SpPlan& pl, cudaStream_t stream) {
  const dim3 grid((unsigned)a.C, (unsigned)pl.qsplits, (unsigned)pl.bgroups);
  const int kW = TRANS ? (int)a.Wo : (int)a.W;
  const bool flat = a.xs[3] == 1 && a.xs[2] == kW;
  if constexpr (std::is_same<T, float>::value) {
    if (sp_tf32(a)) {  // TF32 allowed: small_plane_mma_kernel<float> (the plan is kind 4)
      const int vec_x = flat ? sp_vec(a.x, a.xs, 4, a.sm_major) : 1;
      sp_set_smem(small_plane_mma_kernel<float, TRANS>, pl.bytes);
      small_plane_mma_kernel<float, TRANS><<<grid, SP_THREADS, (size_t)pl.bytes, stream>>>(a, pl, vec_x);
    } else {
      sp_set_smem(small_plane_ffma_kernel<TRANS>, pl.bytes);
      small_plane_ffma_kernel<TRANS><<<grid, SP_THREADS, (size_t)pl.bytes, stream>>>(a, pl);
    }
  } else {
    const int vec_x = flat ? sp_vec(a.x, a.xs, 2, a.sm_major) : 1;
    sp_set_smem(small_plane_mma_kernel<T, TRANS>, pl.bytes);
    small_plane_mma_kernel<T, TRANS><<<grid, SP_THREADS, (size_t)pl.bytes, stream>>>(a, pl, vec_x);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool TRANS>
void sp_dispatch_forward(const ConvArgs& a, const SpPlan& pl, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: sp_launch_forward<float, TRANS>(a, pl, stream); return;
    case DType::kFloat16: sp_launch_forward<__half, TRANS>(a, pl, stream); return;
    case DType::kBFloat16: sp_launch_forward<__nv_bfloat16, TRANS>(a, pl, stream); return;
  }
}

bool sp_gw_plan(const GradWeightArgs& a, SpPlan& pl) {
  if (!sp_rule(a.dtype, a.sm_major, a.N, a.C, a.H, a.W, a.Ho, a.Wo, a.KH, a.KW, a.sh, a.sw, a.dil_h, a.dil_w, a.pt,
               a.pl))
    return false;
  const int kind = a.dtype == DType::kFloat32 ? 3 : 2;
  return sp_make_plan(kind, (int)(a.H * a.W), (int)(a.Ho * a.Wo), (int)(a.KH * a.KW), a.N, a.C, a.max_smem_optin, pl);
}

}  // namespace

bool try_small_plane_forward(const ConvArgs& a, bool transposed, cudaStream_t stream) {
  if (!sp_rule(a.dtype, a.sm_major, a.N, a.C, a.H, a.W, a.Ho, a.Wo, a.KH, a.KW, a.sh, a.sw, a.dil_h, a.dil_w, a.pt,
               a.pl))
    return false;
  const int P = (int)(transposed ? a.Ho * a.Wo : a.H * a.W), Q = (int)(transposed ? a.H * a.W : a.Ho * a.Wo);
  SpPlan pl;
  const int kind = a.dtype == DType::kFloat32 ? (sp_tf32(a) ? 4 : 1) : 0;
  if (!sp_make_plan(kind, P, Q, (int)(a.KH * a.KW), a.N, a.C, a.max_smem_optin, pl)) return false;
  if (transposed)
    sp_dispatch_forward<true>(a, pl, stream);
  else
    sp_dispatch_forward<false>(a, pl, stream);
  return true;
}

int64_t small_plane_grad_weight_splits(const GradWeightArgs& a) {
  SpPlan pl;
  if (!sp_gw_plan(a, pl)) return 0;
  return (int64_t)pl.qsplits * pl.bgroups;
}

void launch_small_plane_grad_weight(const GradWeightArgs& a, cudaStream_t stream) {
  SpPlan pl;
  TORCH_CHECK(sp_gw_plan(a, pl) && (int64_t)pl.qsplits * pl.bgroups == a.splits,
              "lkconv_cuda: small-plane grad_weight called outside its rule or with another split count");
  const dim3 grid((unsigned)a.C, (unsigned)a.splits);
  // cp.async widths for flat contiguous planes (pixel blocks start at multiples of 8)
  const int esz = a.dtype == DType::kFloat32 ? 4 : 2;
  const int vec_x = (a.xs[3] == 1 && a.xs[2] == a.W) ? sp_vec(a.x, a.xs, esz, a.sm_major) : 1;
  const int vec_g = (a.gs[3] == 1 && a.gs[2] == a.Wo) ? sp_vec(a.g, a.gs, esz, a.sm_major) : 1;
  switch (a.dtype) {
    case DType::kFloat32:
      sp_set_smem(small_plane_gw_ffma_kernel, pl.bytes);
      small_plane_gw_ffma_kernel<<<grid, SP_THREADS, (size_t)pl.bytes, stream>>>(a, pl, vec_x, vec_g);
      break;
    case DType::kFloat16:
      sp_set_smem(small_plane_gw_mma_kernel<__half>, pl.bytes);
      small_plane_gw_mma_kernel<__half><<<grid, SP_THREADS, (size_t)pl.bytes, stream>>>(a, pl, vec_x, vec_g);
      break;
    case DType::kBFloat16:
      sp_set_smem(small_plane_gw_mma_kernel<__nv_bfloat16>, pl.bytes);
      small_plane_gw_mma_kernel<__nv_bfloat16><<<grid, SP_THREADS, (size_t)pl.bytes, stream>>>(a, pl, vec_x, vec_g);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lkconv
