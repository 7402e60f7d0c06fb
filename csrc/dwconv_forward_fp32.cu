// lkconv CUDA backend: fp32 (IEEE) forward-style kernel with 2-D register blocks (forward, and the
// stride-1 grad_input, which is the forward of grad_out with the flipped kernel).
//
//   fp32_rb_kernel<R, CC, LC, LR, SUB, WY>   stride 1, dilation 1, KH, KW <= 64, sm80+.
//
// Each thread owns an R x CC block of outputs (R rows, CC consecutive columns) of one plane.  Lanes of a
// warp: LC column blocks x LR row blocks x SUB planes (same channel, consecutive images), CTA = WY warps
// stacked vertically: tile TH = WY*LR*R rows x TW = LC*CC columns x SUB planes.  Staged once per CTA
// (cp.async, zero outside the image): Xs[sub][r][q] = x[n0+sub, c, oh0 - pt + r, c0 + q] with
// c0 = ow0 - pl rounded down to 4 (s0 = ow0 - pl - c0 < 4, so 16/8-byte vectors never straddle column 0),
// and the filter Fs[kw/4][kh][kw%4] (zero for kw >= KW).
//
// Hot loop, per relative input row s of the thread's block (input row rb + s, 0 <= s < R + KH - 1) and per
// chunk of 4 taps kw0 .. kw0+3:  acc[i][j] += x[rb + s][cb + kw + j] * f[s - i][kw]  for the R output rows i
// (kernel row s - i) and CC columns j: one input row feeds R output rows.  The x values live in a ring of
// RS = round_up(CC + 3, 4) registers with compile-time slots (v mod RS for the v-th column from the row's
// start), 4 new LDS.32 per chunk; the chunk loop is unrolled by the ring's period RS/4 so no value moves.
// Each output row's 4 filter taps are one LDS.128 (warp-uniform address: a broadcast); the filter is stored
// chunk-major, Fs[kw/4][kh][kw%4], so the R kernel rows s - i of a chunk sit at compile-time offsets.
// Rows s with every s - i in [0, KH) (the steady state) run all R output rows; the first and last R-1 rows run
// only the output rows whose kernel row is inside the filter, each row count its own instantiation (no guards;
// a guarded variant only when KH < R - 1 puts both ends inside one block).  The taps [kwa, kw_hi)
// (kwa = kw_lo rounded down to 4) run as full chunks; 3 taps left over run as one more full chunk (its 4th
// tap reads a zero filter entry or zero-staged columns), 1 or 2 one at a time with a fresh window.
// Warp-uniform ranges skip rows / 4-tap chunks that only meet the zero border for every lane of the warp.
// All shared-memory index math is int32; no division in any loop but the per-row one of the staging.
//
// Configurations (the launcher picks the one computing the smaller padded area; ties -> the first):
//   <7, 7, 8, 1, 4, 8>  tile 56 x 56 x 4 planes, 8 warps of 7 rows   (56 x 56 planes: one CTA per 4 images)
//   <7, 7, 4, 2, 4, 2>  tile 28 x 28 x 4 planes, 2 warps of 14 rows  (28 x 28 planes)
// A warp covers 7 / 14 rows, so the warps near the top and bottom of a plane skip the rows of the zero border;
// with 7 (LR = 1: every lane of a warp in the same rows) the rows a warp reads are exactly its rows inside the
// image, and only the tile's rows inside the image are staged.
// Shared-memory pitches (frb_pitch): the 32 lanes' x loads (column CC*ct, row R*rt, plane sub) land on 32
// distinct banks in both configurations.
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "dwconv_launch.h"
#include "dwconv_convert.cuh"
#include "dwconv_mma.cuh"

namespace lkconv {

constexpr int FRB_MAX_K = 64;

struct FrbLayout {
  int xr, xcols, xp, ps, fp, f_off, bytes;  // offsets / pitches in floats (fp: KW rounded up to 4)
};

// row pitch XP = xp_rem (mod xp_mod), plane pitch PS = ps_rem (mod ps_mod): chosen per lane arrangement so that
// the 32 lanes' x loads (column CC*ct, row R*rt, plane sub) land on 32 distinct banks (CC = R = 7)
struct FrbPitch {
  int xp_mod, xp_rem, ps_mod, ps_rem;
};
__host__ __device__ __forceinline__ FrbPitch frb_pitch(int LC, int LR, int SUB) {
  if (LC == 8 && LR == 2 && SUB == 2) return FrbPitch{16, 8, 32, 16};
  if (LC == 4 && LR == 2 && SUB == 4) return FrbPitch{8, 4, 16, 8};
  if (LC == 8 && LR == 1 && SUB == 4) return FrbPitch{4, 0, 16, 8};
  return FrbPitch{16, 8, 8, 4};  // (8, 4, 1) and (4, 4, 2)
}

// rows_cap: the staged rows are at most this many (the image height when a warp's lanes share one row block,
// LR = 1: then the row range of every warp is exactly its rows inside the image, and the border rows of the
// tile are not staged), TH + KH - 1 otherwise
__host__ __device__ __forceinline__ FrbLayout frb_layout(int KH, int KW, int TH, int TW, int SUB, FrbPitch p,
                                                        int rows_cap) {
  FrbLayout L;
  L.xr = TH + KH - 1 < rows_cap ? TH + KH - 1 : rows_cap;
  L.xcols = round_up_i(TW + KW + 3, 4);  // columns read: s0 + (TW - CC) + kw + j (+ look-ahead) <= TW + KW + 2
  L.xp = round_up_i(L.xcols - p.xp_rem, p.xp_mod) + p.xp_rem;        // >= xcols
  L.ps = round_up_i(L.xr * L.xp - p.ps_rem, p.ps_mod) + p.ps_rem;    // >= xr * xp
  L.fp = round_up_i(KW, 4);
  L.f_off = round_up_i(SUB * L.ps, 4);
  L.bytes = (L.f_off + KH * L.fp) * 4;
  return L;
}

__host__ __device__ __forceinline__ int frb_rows_cap(int LR, int TH, int KH, int64_t H) {
  return LR == 1 && H < TH + KH - 1 ? (int)H : TH + KH - 1;
}

namespace {

// One 4-tap chunk at ring phase P: load the 4 columns CC-1 .. CC+2 (relative to the chunk start) into their
// slots, then for each output row i in [I0, I1) the 4 filter taps of kernel row s - i (one LDS.128 at fs - 4 i)
// times the CC-wide windows.  GUARD: skip the rows whose kernel row s - i is outside [0, KH) (warp-uniform).
template <int R, int CC, int RS, int P, int I0, int I1, bool GUARD>
__device__ __forceinline__ void frb_chunk(float (&acc)[R][CC], float (&ring)[RS], const float* xs, const float* fs,
                                          int s, int KH) {
#pragma unroll
  for (int t = 0; t < 4; ++t) ring[(4 * P + CC - 1 + t) % RS] = xs[CC - 1 + t];
#pragma unroll
  for (int i = I0; i < I1; ++i) {
    if (GUARD && (unsigned)(s - i) >= (unsigned)KH) continue;
    const float4 f = *reinterpret_cast<const float4*>(fs - 4 * i);
    const float fv[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int j = 0; j < CC; ++j) acc[i][j] = fmaf(ring[(4 * P + t + j) % RS], fv[t], acc[i][j]);
  }
}

// One tap with a fresh window: xs[j] for the CC columns, kernel row s - i at fs[-4 i].
template <int R, int CC, int I0, int I1, bool GUARD>
__device__ __forceinline__ void frb_tap(float (&acc)[R][CC], const float* xs, const float* fs, int s, int KH) {
  float xv[CC];
#pragma unroll
  for (int j = 0; j < CC; ++j) xv[j] = xs[j];
#pragma unroll
  for (int i = I0; i < I1; ++i) {
    if (GUARD && (unsigned)(s - i) >= (unsigned)KH) continue;
    const float f = fs[-4 * i];
#pragma unroll
    for (int j = 0; j < CC; ++j) acc[i][j] = fmaf(xv[j], f, acc[i][j]);
  }
}

// keep a loop-invariant value in a register (the compiler would otherwise recompute the 64-bit clamps it
// comes from in every iteration of the row loop)
__device__ __forceinline__ int frb_opaque(int v) {
  asm volatile("" : "+r"(v));
  return v;
}

// One input row s for the output rows [I0, I1): nfull full chunks (3 per loop iteration: the ring's period),
// then ntail (<= 2) single taps.  xs points at column kwa of the row, fs at chunk kwa / 4, kernel row s of the
// filter; the next chunk's filter taps are kh4 = 4 KH floats further.
template <int R, int CC, int I0, int I1, bool GUARD>
__device__ __forceinline__ void frb_row(float (&acc)[R][CC], const float* xs, const float* fs, int nfull, int ntail,
                                        int s, int KH, int kh4) {
  constexpr int RS = (CC + 3 + 3) / 4 * 4;
  static_assert(RS / 4 == 3, "the chunk loop below is unrolled for a ring period of 3 chunks");
  const float* xt = xs + 4 * nfull;
  const float* ft = fs + nfull * kh4;
  float ring[RS];
#pragma unroll
  for (int v = 0; v < CC - 1; ++v) ring[v] = xs[v];
  const int n3 = nfull / 3, rem = nfull - 3 * n3;
  for (int k = 0; k < n3; ++k) {
    frb_chunk<R, CC, RS, 0, I0, I1, GUARD>(acc, ring, xs, fs, s, KH);
    frb_chunk<R, CC, RS, 1, I0, I1, GUARD>(acc, ring, xs + 4, fs + kh4, s, KH);
    frb_chunk<R, CC, RS, 2, I0, I1, GUARD>(acc, ring, xs + 8, fs + 2 * kh4, s, KH);
    xs += 12;
    fs += 3 * kh4;
  }
  if (rem > 0) frb_chunk<R, CC, RS, 0, I0, I1, GUARD>(acc, ring, xs, fs, s, KH);
  if (rem > 1) frb_chunk<R, CC, RS, 1, I0, I1, GUARD>(acc, ring, xs + 4, fs + kh4, s, KH);
  if (ntail > 0) frb_tap<R, CC, I0, I1, GUARD>(acc, xt, ft, s, KH);
  if (ntail > 1) frb_tap<R, CC, I0, I1, GUARD>(acc, xt + 1, ft + 1, s, KH);
}

// the first R-1 rows s (output rows [0, s + 1)) and the last R-1 (rows [s - KH + 1, R)) as their own
// instantiations, so no row needs a guard when KH >= R - 1: rows [0, V) for v == V, rows [R - V, R) for v == V
template <int R, int CC, int V>
__device__ __forceinline__ void frb_row_head(int v, float (&acc)[R][CC], const float* xs, const float* fs, int nfull,
                                             int ntail, int s, int KH, int kh4) {
  if constexpr (V > 0) {
    if (v == V)
      frb_row<R, CC, 0, V, false>(acc, xs, fs, nfull, ntail, s, KH, kh4);
    else
      frb_row_head<R, CC, V - 1>(v, acc, xs, fs, nfull, ntail, s, KH, kh4);
  }
}
template <int R, int CC, int V>
__device__ __forceinline__ void frb_row_foot(int v, float (&acc)[R][CC], const float* xs, const float* fs, int nfull,
                                             int ntail, int s, int KH, int kh4) {
  if constexpr (V > 0) {
    if (v == V)
      frb_row<R, CC, R - V, R, false>(acc, xs, fs, nfull, ntail, s, KH, kh4);
    else
      frb_row_foot<R, CC, V - 1>(v, acc, xs, fs, nfull, ntail, s, KH, kh4);
  }
}

template <int R, int CC, int LC, int LR, int SUB, int WY>
__global__ void __launch_bounds__(32 * WY) fp32_rb_kernel(ConvArgs a, int vec_x) {
  static_assert(LC * LR * SUB == 32, "a warp is LC x LR x SUB lanes");
  constexpr int TW = LC * CC, TH = WY * LR * R, THREADS = 32 * WY;
  extern __shared__ __align__(16) float frb_smem[];
  const int KH = (int)a.KH, KW = (int)a.KW;
  constexpr bool CLIP = LR == 1;  // stage only the tile's rows inside the image
  const FrbLayout L = frb_layout(KH, KW, TH, TW, SUB, frb_pitch(LC, LR, SUB), frb_rows_cap(LR, TH, KH, a.H));
  float* Xs = frb_smem;
  float* Fs = frb_smem + L.f_off;

  // blockIdx.x = group * C + c (group = SUB consecutive images); 32-bit: the grid x limit bounds both
  const unsigned C32 = (unsigned)a.C;
  const unsigned c = blockIdx.x % C32, grp = blockIdx.x / C32;
  const int64_t n0 = (int64_t)grp * SUB;
  const int64_t ow0 = (int64_t)blockIdx.y * TW, oh0 = (int64_t)blockIdx.z * TH;
  const int64_t c0 = floor_div(ow0 - a.pl, 4) * 4;
  const int s0 = (int)(ow0 - a.pl - c0);
  const float* __restrict__ xg = static_cast<const float*>(a.x);
  const float* __restrict__ wc = static_cast<const float*>(a.w) + (int64_t)c * KH * KW;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  {  // stage x: per plane the (row, vector) pairs of the tile, flattened over the CTA's threads (int32 index
     // math, one division per thread); zero outside the image and for images >= N
    const int ve = vec_x, vpr = L.xcols / ve;
    const int dr = THREADS / vpr, dj = THREADS - dr * vpr;
    // rows r with oh0 - pt + r in [0, H), columns q = j * ve with c0 + q in [0, W) (c0 is a multiple of ve)
    const int64_t rlo64 = a.pt - oh0, rhi64 = a.H + a.pt - oh0, qlo64 = -c0, qhi64 = a.W - c0;
    const int xr_tile = TH + KH - 1;
    const int r_lo = (int)(rlo64 < 0 ? 0 : (rlo64 > xr_tile ? xr_tile : rlo64));
    const int r_hi = (int)(rhi64 < 0 ? 0 : (rhi64 > xr_tile ? xr_tile : rhi64));
    const int r0 = CLIP ? r_lo : 0;  // tile row of shared-memory row 0
    const int q_lo = (int)(qlo64 < 0 ? 0 : (qlo64 > L.xcols ? L.xcols : qlo64));
    const int q_hi = (int)(qhi64 < 0 ? 0 : (qhi64 > L.xcols ? L.xcols : qhi64));
#pragma unroll 1
    for (int sub = 0; sub < SUB; ++sub) {
      const int64_t n = n0 + sub;
      const bool n_in = n < a.N;
      // element (r, q) of the tile: base + r * xs[2] + q * xs[3] (dereferenced only inside the image)
      const float* base = xg + (n_in ? n * a.xs[0] + (int64_t)c * a.xs[1] + (oh0 - a.pt) * a.xs[2] + c0 * a.xs[3] : 0);
      float* dplane = Xs + sub * L.ps;
      int rr = threadIdx.x / vpr, j = threadIdx.x - rr * vpr;  // shared-memory row rr = tile row rr + r0
      while (rr < L.xr) {
        const int q = j * ve, r = rr + r0;
        int cnt = 0;
        if (n_in && r >= r_lo && r < r_hi && q >= q_lo && q < q_hi) cnt = q_hi - q < ve ? q_hi - q : ve;
        cp_async_zfill(dplane + rr * L.xp + q, cnt ? base + (int64_t)r * a.xs[2] + (int64_t)q * a.xs[3] : xg, 4 * ve,
                       4 * cnt);
        rr += dr;
        j += dj;
        if (j >= vpr) {
          j -= vpr;
          ++rr;
        }
      }
    }
    // filter, chunk-major: Fs[(kw / 4) * 4 KH + 4 kh + kw % 4] (zero for kw >= KW)
    for (int kh = warp; kh < KH; kh += WY)
      for (int kw = lane; kw < L.fp; kw += 32)
        Fs[(kw >> 2) * (4 * KH) + 4 * kh + (kw & 3)] = kw < KW ? __ldg(wc + kh * KW + kw) : 0.f;
    cp_async_wait_all();
  }
  __syncthreads();

  const int64_t wr0 = oh0 + warp * (LR * R);  // first output row of this warp
  if (wr0 >= a.Ho) return;                    // no barrier below
  const int sub = lane / (LC * LR), rt = (lane / LC) % LR, ct = lane % LC;
  const int rb = warp * (LR * R) + rt * R, cb = ct * CC;
  // tile row rb + s sits in shared-memory row rb + s - r0 (r0 > 0 only with CLIP, where s_lo below keeps every
  // row read inside the image)
  int r0 = 0;
  if (CLIP) {
    const int64_t rlo64 = a.pt - oh0;
    r0 = (int)(rlo64 < 0 ? 0 : (rlo64 > TH + KH - 1 ? TH + KH - 1 : rlo64));
  }
  const float* xb = Xs + sub * L.ps + (rb - r0) * L.xp + s0 + cb;

  // warp-uniform ranges: relative input rows s whose input row is inside the image for some lane of the
  // warp, taps kw that meet the image for some column of the tile
  const int SR = R + KH - 1;
  int64_t s_lo64 = a.pt - (wr0 + (LR - 1) * R), s_hi64 = a.H + a.pt - wr0;
  const int s_lo = (int)(s_lo64 < 0 ? 0 : (s_lo64 > SR ? SR : s_lo64));
  const int s_hi = (int)(s_hi64 < 0 ? 0 : (s_hi64 > SR ? SR : s_hi64));
  int64_t kw_lo64 = a.pl - (ow0 + TW - 1), kw_hi64 = a.W + a.pl - ow0;
  const int kw_lo = (int)(kw_lo64 < 0 ? 0 : (kw_lo64 > KW ? KW : kw_lo64));
  const int kw_hi = (int)(kw_hi64 < 0 ? 0 : (kw_hi64 > KW ? KW : kw_hi64));
  const int kwa = frb_opaque(kw_lo & ~3);
  const int ntap = kw_hi - kwa;  // > 0 when kw_lo < kw_hi
  const int nfull = frb_opaque((ntap >> 2) + ((ntap & 3) == 3 ? 1 : 0));
  const int ntail = frb_opaque((ntap & 3) == 3 ? 0 : (ntap & 3));
  const int s_end = frb_opaque(s_hi);
  const int xoff = frb_opaque((int)(xb - Xs)), foff = frb_opaque(kwa * KH);

  float acc[R][CC];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < CC; ++j) acc[i][j] = 0.f;

  if (kw_lo < kw_hi) {
    for (int s = s_lo; s < s_end; ++s) {
      const float* xrow = Xs + xoff + s * L.xp;
      const float* frow = Fs + foff + 4 * s;  // chunk kwa / 4, kernel row s (row s - i: frow - 4 i)
      const int i_lo = s - KH + 1 > 0 ? s - KH + 1 : 0, i_hi = s + 1 < R ? s + 1 : R;  // rows with s - i in [0, KH)
      if (i_lo == 0 && i_hi == R)
        frb_row<R, CC, 0, R, false>(acc, xrow + kwa, frow, nfull, ntail, s, KH, 4 * KH);
      else if (i_lo == 0)
        frb_row_head<R, CC, R - 1>(i_hi, acc, xrow + kwa, frow, nfull, ntail, s, KH, 4 * KH);
      else if (i_hi == R)
        frb_row_foot<R, CC, R - 1>(R - i_lo, acc, xrow + kwa, frow, nfull, ntail, s, KH, 4 * KH);
      else  // KH < R - 1: both ends inside the block
        frb_row<R, CC, 0, R, true>(acc, xrow + kwa, frow, nfull, ntail, s, KH, 4 * KH);
    }
  }

  const int64_t n = n0 + sub;
  if (n >= a.N) return;
  const float b = a.bias != nullptr ? static_cast<const float*>(a.bias)[c] : 0.f;
  float* yp = static_cast<float*>(a.y) + n * a.ys[0] + (int64_t)c * a.ys[1];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t oh = oh0 + rb + i;
    if (oh >= a.Ho) break;
    float* yr = yp + oh * a.ys[2];
#pragma unroll
    for (int j = 0; j < CC; ++j) {
      const int64_t ow = ow0 + cb + j;
      if (ow < a.Wo) yr[ow * a.ys[3]] = acc[i][j] + b;
    }
  }
}

bool frb_grid_ok(int64_t gx, int64_t gy, int64_t gz) {
  return gx >= 1 && gx <= kMaxGridX && gy >= 1 && gy <= kMaxGridYZ && gz >= 1 && gz <= kMaxGridYZ;
}

template <int R, int CC, int LC, int LR, int SUB, int WY>
bool launch_frb_cfg(const ConvArgs& a, cudaStream_t stream) {
  constexpr int TW = LC * CC, TH = WY * LR * R;
  const FrbLayout L = frb_layout((int)a.KH, (int)a.KW, TH, TW, SUB, frb_pitch(LC, LR, SUB),
                                 frb_rows_cap(LR, TH, (int)a.KH, a.H));
  if (L.bytes > a.max_smem_optin) return false;
  const int64_t gx = ceil_div(a.N, SUB) * a.C, gy = ceil_div(a.Wo, TW), gz = ceil_div(a.Ho, TH);
  if (!frb_grid_ok(gx, gy, gz)) return false;
  const int vec_x = vec_elems(a.x, a.xs, 4, a.sm_major);  // 4, 2 or 1 (1: 4-byte cp.async per element)
  if (L.bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(fp32_rb_kernel<R, CC, LC, LR, SUB, WY>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, L.bytes));
  }
  fp32_rb_kernel<R, CC, LC, LR, SUB, WY>
      <<<dim3((unsigned)gx, (unsigned)gy, (unsigned)gz), 32 * WY, (size_t)L.bytes, stream>>>(a, vec_x);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

// 1 = the 28 x 28 tile, 0 = the 56 x 56 tile: whichever computes fewer outputs (ties -> 56 x 56)
bool fp32_rb_small_tile(int64_t Ho, int64_t Wo) {
  const int64_t big = ceil_div(Ho, 56) * 56 * ceil_div(Wo, 56) * 56;
  const int64_t small = ceil_div(Ho, 28) * 28 * ceil_div(Wo, 28) * 28;
  return small < big;
}

bool try_fp32_rb(const ConvArgs& a, cudaStream_t stream) {
  if (a.dtype != DType::kFloat32 || a.sm_major < 8) return false;  // cp.async staging: sm80+
  if (a.sh != 1 || a.sw != 1 || a.dil_h != 1 || a.dil_w != 1) return false;
  if (a.KH > FRB_MAX_K || a.KW > FRB_MAX_K) return false;
  if (fp32_rb_small_tile(a.Ho, a.Wo)) return launch_frb_cfg<7, 7, 4, 2, 4, 2>(a, stream);
  return launch_frb_cfg<7, 7, 8, 1, 4, 8>(a, stream) || launch_frb_cfg<7, 7, 4, 2, 4, 2>(a, stream);
}

}  // namespace lkconv
