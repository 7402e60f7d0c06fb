// lkconv CUDA backend: grad_weight on small planes by row pairs, fp16/bf16 (sm80+), stride 1, dilation 1.
//
// With dh = ih - oh (kh = dh + pt) and dw = iw - ow (kw = dw + pl):
//   R_dh[ow, iw] = sum_n sum_{oh valid} dY[n, oh, ow] X[n, oh + dh, iw]     (a 16 x 16 GEMM per dh, K = (n, oh))
//   dW[kh, kw]   = sum_{ow} R_dh[ow, ow + dw]
// dh runs over [dh_lo, dh_hi] = [max(-pt, 1 - Ho), min(KH - 1 - pt, H - 1)] (<= H + Ho - 1 <= 31 values).
//
//   small_plane_gw_rows_kernel<T>   grid (C, batch groups), 8 warps.  Warp w owns the GR_ND consecutive dh
//     d0 = dh_lo + GR_ND w .. d0 + GR_ND - 1 (clipped to dh_hi), each as a 16 x 16 fp32 accumulator (2 n8 tiles of
//     m16n8k16: 8 registers).  Per staged chunk of GR_MB images (double buffer: chunk i + 1 is in flight while
//     chunk i is multiplied) and per output row oh of the warp's range (the oh with at least one valid pair): per
//     16-image k step one ldmatrix.x4.trans of the dY rows (A[ow][n], reused by every dh of the warp) and, for
//     every dh with 0 <= oh + dh < H, one ldmatrix.x4.trans of the x rows oh + dh (B[n][iw], two n8 tiles) and
//     two mma.sync.  Only valid (oh, dh) pairs are multiplied.
//     Shared memory per stage: Xs[n][ih][16] (image pitch H*16 + 8 elements: an odd number of 16-byte units, so the
//     8 image rows of an ldmatrix phase hit distinct banks), Ys[n][oh][16] likewise.  Columns iw >= W / ow >= Wo
//     are never written: they only reach R entries the tap sums never read.  Images n >= N of the last chunk are
//     zero-filled (both planes) up to the next multiple of 16.  Flat contiguous planes: cp.async of VE = 8 / 4 / 2
//     elements (W resp. Wo a multiple, pointer and strides aligned), per lane precomputed (smem, global) offsets;
//     else element loads (also channels_last and strided views, by strides).
//     Epilogue: the accumulators to Rs[dh - dh_lo][ow][GR_RP] (float2 per fragment row pair, aliasing the
//     staging buffers after a barrier), then thread = tap sums R over ow = 0 .. Wo - 1 in order (predicated on
//     0 <= ow + dw < W) into partial[split, c, tap]; grad_weight_reduce_kernel adds the splits in split order.
//     Deterministic: fixed split count (shapes only), fixed summation order, no atomics.
// Mirrored by csrc/kernel_emulation.py (section "small-plane grad_weight by row pairs").
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "dwconv_small_plane_gw_rows.h"
#include "dwconv_small_plane.h"
#include "dwconv_convert.cuh"
#include "dwconv_mma.cuh"

namespace lkconv {

struct GrPlan {
  int dh_lo, ndh;       // dh range [dh_lo, dh_lo + ndh)
  int xpi, ypi;         // image pitches in elements (H*16 + 8, Ho*16 + 8)
  int stage_bytes;      // one stage: Xs then Ys
  int bytes;            // dynamic shared memory: max(2 stages, Rs)
  int64_t nchunks, cpg; // chunks of GR_MB images, chunks per batch group
  int bgroups;
};

__host__ __device__ inline GrPlan gr_plan(int64_t N, int64_t C, int H, int Ho, int KH, int pt) {
  GrPlan p;
  p.dh_lo = -pt > 1 - Ho ? -pt : 1 - Ho;
  const int dh_hi = KH - 1 - pt < H - 1 ? KH - 1 - pt : H - 1;
  p.ndh = dh_hi - p.dh_lo + 1 > 0 ? dh_hi - p.dh_lo + 1 : 0;
  p.xpi = H * 16 + 8;
  p.ypi = Ho * 16 + 8;
  p.stage_bytes = GR_MB * (p.xpi + p.ypi) * 2;
  const int rs = p.ndh * 16 * GR_RP * 4;
  p.bytes = 2 * p.stage_bytes > rs ? 2 * p.stage_bytes : rs;
  p.nchunks = (N + GR_MB - 1) / GR_MB;
  int64_t bg = (512 + C - 1) / C;  // >= ~512 CTAs where the batch allows
  if (bg > p.nchunks) bg = p.nchunks;
  if (bg > 1024) bg = 1024;
  if (bg < 1) bg = 1;
  p.cpg = (p.nchunks + bg - 1) / bg;
  p.bgroups = (int)((p.nchunks + p.cpg - 1) / p.cpg);
  return p;
}

__device__ __forceinline__ void gr_ldsm_t(uint32_t* r, uint32_t addr) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

__device__ __forceinline__ void gr_commit() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int PENDING>
__device__ __forceinline__ void gr_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// per-lane staging offsets of a flat plane (rows of `w` elements, `rows` rows): vector u = lane + 32 k of the
// image, VE elements each, at smem byte 2 ((u / nvw) * 16 + (u % nvw) * VE), global element u * VE (-1: no vector).
// A plane has <= 256 elements and VE >= 2: <= 128 vectors, 4 per lane.
template <int VE>
__device__ __forceinline__ void gr_offsets(int (&soff)[4], int w, int rows) {
  const int nvw = w / VE, nv = nvw * rows, lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int u = lane + 32 * k;
    const int r = u / nvw;
    soff[k] = u < nv ? 2 * (r * 16 + (u - r * nvw) * VE) : -1;
  }
}

template <int BYTES>
__device__ __forceinline__ void gr_cp_async(uint32_t dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(BYTES), "r"(src_bytes));
#endif
}

// stage images [0, kpad) of a chunk at smem byte address dst (image pitch ip_b bytes): images m < rv from
// src + m * s_img (flat plane, vectors of VE, global byte offset 2 VE (lane + 32 k) = an immediate per k),
// the rest zero-filled (src-size 0)
template <typename T, int VE>
__device__ __forceinline__ void gr_stage_vec(uint32_t dst, int ip_b, const T* src, int64_t s_img, int rv, int kpad,
                                             const int (&soff)[4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const char* s0 = reinterpret_cast<const char*>(src) + lane * (2 * VE);  // image 0: a valid address for zero-fill
  const char* s = s0 + warp * s_img * 2;
  const int64_t step = GR_WARPS * s_img * 2;
  uint32_t d = dst + warp * ip_b;
  for (int m = warp; m < kpad; m += GR_WARPS, s += step, d += GR_WARPS * ip_b) {
    const bool v = m < rv;
    const char* sp = v ? s : s0;
    const int nb = v ? 2 * VE : 0;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (soff[k] >= 0) gr_cp_async<2 * VE>(d + soff[k], sp + k * 64 * VE, nb);
  }
}

// element path (odd widths, misaligned pointers, channels_last, strided views): pixel (r, q) of image m at
// src + m * s_img + r * s2 + q * s3
template <typename T>
__device__ __noinline__ void gr_stage_elems(T* S, int ip, const T* src, int64_t s_img, int64_t s2, int64_t s3, int w,
                                            int rows, int rv, int kpad) {
  const T zero = Cvt<T>::from_f(0.f);
  const int per = rows * w;
  for (int e = threadIdx.x; e < kpad * per; e += GR_THREADS) {
    const int m = e / per, pix = e - m * per, r = pix / w, q = pix - r * w;
    S[m * ip + r * 16 + q] = m < rv ? src[m * s_img + r * s2 + q * s3] : zero;
  }
}

// VE: the cp.async vector (elements) of both planes' staging, 1 = element loads
template <typename T, int VE>
__global__ void __launch_bounds__(GR_THREADS, 2) small_plane_gw_rows_kernel(GradWeightArgs a, GrPlan p) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  extern __shared__ __align__(128) unsigned char smem_gr[];
  const int H = (int)a.H, W = (int)a.W, Ho = (int)a.Ho, Wo = (int)a.Wo;
  const int64_t c = blockIdx.x;
  const int bg = (int)blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* __restrict__ xg = static_cast<const T*>(a.x) + c * a.xs[1];
  const T* __restrict__ gg = static_cast<const T*>(a.g) + c * a.gs[1];
  int sox[4], soy[4];
  if constexpr (VE > 1) {
    gr_offsets<VE>(sox, W, H);
    gr_offsets<VE>(soy, Wo, Ho);
  }
  const int64_t ch0 = (int64_t)bg * p.cpg;
  const int64_t ch1 = ch0 + p.cpg < p.nchunks ? ch0 + p.cpg : p.nchunks;
  const int ys_off = GR_MB * p.xpi;  // elements of T within a stage

  // the warp's dh set and output-row range
  const int d0 = p.dh_lo + GR_ND * warp;
  const int ndw = p.ndh - GR_ND * warp < GR_ND ? p.ndh - GR_ND * warp : GR_ND;  // may be <= 0: no pairs
  const int oh_lo = -(d0 + ndw - 1) > 0 ? -(d0 + ndw - 1) : 0;
  const int oh_hi = ndw <= 0 ? 0 : (H - d0 < Ho ? H - d0 : Ho);
  // ldmatrix.trans lane rows: A (Ys, rows = images): image (lane & 7) + 8 ((lane >> 4) & 1), ow half (lane >> 3) & 1;
  // B (Xs): image (lane & 7) + 8 ((lane >> 3) & 1), iw half (lane >> 4) & 1
  const uint32_t a_lane = (uint32_t)((((lane >> 4) & 1) * 8 + (lane & 7)) * p.ypi * 2 + ((lane >> 3) & 1) * 16);
  const uint32_t b_lane = (uint32_t)((((lane >> 3) & 1) * 8 + (lane & 7)) * p.xpi * 2 + ((lane >> 4) & 1) * 16);
  const uint32_t a_k = 16 * p.ypi * 2, b_k = 16 * p.xpi * 2;  // bytes per 16-image k step
  const uint32_t smem_u = smem_u32(smem_gr);

  float acc[GR_ND][2][4];
#pragma unroll
  for (int j = 0; j < GR_ND; ++j)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[j][nt][r] = 0.f;

  auto stage = [&](int64_t ch, int buf) {
    const int64_t n0 = ch * GR_MB;
    const int rv = a.N - n0 < GR_MB ? (int)(a.N - n0) : GR_MB;
    const int kpad = (rv + 15) & ~15;
    if constexpr (VE > 1) {
      const uint32_t xd = smem_u32(smem_gr) + buf * p.stage_bytes;
      gr_stage_vec<T, VE>(xd, p.xpi * 2, xg + n0 * a.xs[0], a.xs[0], rv, kpad, sox);
      gr_stage_vec<T, VE>(xd + ys_off * 2, p.ypi * 2, gg + n0 * a.gs[0], a.gs[0], rv, kpad, soy);
      gr_commit();
    } else {
      T* Xs = reinterpret_cast<T*>(smem_gr + buf * p.stage_bytes);
      gr_stage_elems<T>(Xs, p.xpi, xg + n0 * a.xs[0], a.xs[0], a.xs[2], a.xs[3], W, H, rv, kpad);
      gr_stage_elems<T>(Xs + ys_off, p.ypi, gg + n0 * a.gs[0], a.gs[0], a.gs[2], a.gs[3], Wo, Ho, rv, kpad);
    }
  };

  stage(ch0, 0);
  for (int64_t ch = ch0; ch < ch1; ++ch) {
    const int buf = (int)((ch - ch0) & 1);
    if (ch + 1 < ch1) {
      stage(ch + 1, buf ^ 1);  // the other buffer: its readers passed the barrier at the end of the last round
      if constexpr (VE > 1) gr_wait<1>();
    } else {
      if constexpr (VE > 1) gr_wait<0>();
    }
    __syncthreads();
    const int64_t n0 = ch * GR_MB;
    const int rv = a.N - n0 < GR_MB ? (int)(a.N - n0) : GR_MB;
    const bool k2 = rv > 16;  // second 16-image k step live
    const uint32_t xs_u = smem_u + buf * p.stage_bytes, ys_u = xs_u + ys_off * 2;
    for (int oh = oh_lo; oh < oh_hi; ++oh) {
      // valid j: 0 <= oh + d0 + j < H, j < ndw
      const int jlo = -(oh + d0) > 0 ? -(oh + d0) : 0;
      const int jhi = H - oh - d0 < ndw ? H - oh - d0 : ndw;
      const uint32_t ao = ys_u + a_lane + oh * 32, bo = xs_u + b_lane + (oh + d0) * 32;
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        if (ks == 1 && !k2) break;
        uint32_t af[4];
        gr_ldsm_t(af, ao + ks * a_k);
#pragma unroll
        for (int j = 0; j < GR_ND; ++j) {
          if (j < jlo || j >= jhi) continue;
          uint32_t bf[4];
          gr_ldsm_t(bf, bo + ks * b_k + j * 32);
          MmaOp<T>::run(acc[j][0], af, bf[0], bf[1]);
          MmaOp<T>::run(acc[j][1], af, bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // this buffer is restaged two rounds on / aliased by Rs
  }

  // epilogue: accumulators -> Rs[dh - dh_lo][ow][GR_RP], then one thread per tap
  float* Rs = reinterpret_cast<float*>(smem_gr);
  {
    const int g4 = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int j = 0; j < GR_ND; ++j) {
      if (j >= ndw) continue;
      float* r = Rs + (GR_ND * warp + j) * 16 * GR_RP;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          *reinterpret_cast<float2*>(r + (g4 + 8 * h) * GR_RP + nt * 8 + 2 * t4) =
              make_float2(acc[j][nt][2 * h], acc[j][nt][2 * h + 1]);
    }
  }
  __syncthreads();
  const int KH = (int)a.KH, KW = (int)a.KW, pt = (int)a.pt, pl = (int)a.pl;
  float* out = a.partial + ((int64_t)bg * a.C + c) * (KH * KW);
  for (int t = threadIdx.x; t < KH * KW; t += GR_THREADS) {
    const int kh = t / KW, kw = t - kh * KW;
    const int di = kh - pt - p.dh_lo, dw = kw - pl;
    float s = 0.f;
    if (di >= 0 && di < p.ndh) {
      const float* r = Rs + di * 16 * GR_RP;  // R[ow][iw] at r[ow * GR_RP + iw]
      for (int ow = 0; ow < Wo; ++ow) {
        const int iw = ow + dw;
        if (iw >= 0 && iw < W) s += r[ow * GR_RP + iw];
      }
    }
    out[t] = s;
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------
namespace {

bool gr_rule(const GradWeightArgs& a) {
  if (a.dtype == DType::kFloat32 || a.sm_major < 8) return false;
  if (a.sh != 1 || a.sw != 1 || a.dil_h != 1 || a.dil_w != 1) return false;
  if (a.W < GR_MIN_W || a.W > GR_MAX_SIDE || a.H < 1 || a.H > GR_MAX_SIDE) return false;
  if (a.Wo < 1 || a.Wo > GR_MAX_SIDE || a.Ho < 1 || a.Ho > GR_MAX_SIDE || a.N < 1) return false;
  if (small_plane_grad_weight_splits(a) <= 0) return false;  // only where small_plane_gw_mma_kernel would run
  const GrPlan p = gr_plan(a.N, a.C, (int)a.H, (int)a.Ho, (int)a.KH, (int)a.pt);
  const int budget = a.max_smem_optin < SP_SMEM_BUDGET ? a.max_smem_optin : SP_SMEM_BUDGET;
  return p.bytes <= budget;
}

// cp.async width (elements) for a flat contiguous plane of rows `w` wide: VE divides w, pointer and image /
// channel strides aligned to VE; 1 = element loads
int gr_vec(const void* ptr, const int64_t* st, int64_t w, int sm_major) {
  if (sm_major < 8 || st[3] != 1 || st[2] != w) return 1;
  for (int ve = 8; ve >= 2; ve /= 2)
    if (w % ve == 0 && reinterpret_cast<uintptr_t>(ptr) % (2 * ve) == 0 && st[0] % ve == 0 && st[1] % ve == 0)
      return ve;
  return 1;
}

}  // namespace

bool gw_rows_applies(const GradWeightArgs& a) { return gr_rule(a); }

int64_t gw_rows_splits(const GradWeightArgs& a) {
  if (!gr_rule(a)) return 0;
  return gr_plan(a.N, a.C, (int)a.H, (int)a.Ho, (int)a.KH, (int)a.pt).bgroups;
}

template <typename T, int VE>
void gr_launch(const GradWeightArgs& a, const GrPlan& p, cudaStream_t stream) {
  const dim3 grid((unsigned)a.C, (unsigned)p.bgroups);
  if (p.bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(small_plane_gw_rows_kernel<T, VE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        p.bytes));
  small_plane_gw_rows_kernel<T, VE><<<grid, GR_THREADS, (size_t)p.bytes, stream>>>(a, p);
}

template <typename T>
void gr_dispatch(const GradWeightArgs& a, const GrPlan& p, int ve, cudaStream_t stream) {
  switch (ve) {
    case 8: gr_launch<T, 8>(a, p, stream); break;
    case 4: gr_launch<T, 4>(a, p, stream); break;
    case 2: gr_launch<T, 2>(a, p, stream); break;
    default: gr_launch<T, 1>(a, p, stream); break;
  }
}

void launch_gw_rows(const GradWeightArgs& a, cudaStream_t stream) {
  TORCH_CHECK(gr_rule(a), "lkconv_cuda: small-plane row-pair grad_weight called outside its rule");
  const GrPlan p = gr_plan(a.N, a.C, (int)a.H, (int)a.Ho, (int)a.KH, (int)a.pt);
  TORCH_CHECK(p.bgroups == a.splits, "lkconv_cuda: row-pair grad_weight split count mismatch");
  // one vector width for both planes: the narrower one's (powers of two: it divides W and Wo and fits both)
  const int vx = gr_vec(a.x, a.xs, a.W, a.sm_major), vg = gr_vec(a.g, a.gs, a.Wo, a.sm_major);
  const int ve = vx < vg ? vx : vg;
  if (a.dtype == DType::kFloat16)
    gr_dispatch<__half>(a, p, ve, stream);
  else
    gr_dispatch<__nv_bfloat16>(a, p, ve, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lkconv
