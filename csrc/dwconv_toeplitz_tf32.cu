// lkconv CUDA backend: toeplitz_tf32_kernel, the fp32 forward / stride-1 grad_input on TF32 tensor cores
// (mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, fp32 accumulate).  Used only when PyTorch allows TF32
// for convolutions (lkconv.precision.conv_tf32_enabled(); the Python side passes algo = 2, ConvArgs::allow_tf32),
// fp32, stride 1, dilation 1, KH, KW <= 64, sm80+, planes larger than the small-plane rule (those run
// small_plane_mma_kernel<float>, the small-plane GEMM on TF32 tensor cores, dwconv_small_plane.cu).  Everything
// else, and TF32 disallowed, runs the IEEE fp32 kernels as before.
//
// The tiling is toeplitz_mma_kernel's "image-rows" tiling (dwconv_forward.cu) with 32-bit elements.  For one
// channel c, kernel row kh and output row oh the 1-D convolution along W of TF_IMG = 8 images is
//   Y[i, n] += sum_k A_d[i, k] * B_kc[k, n]     (m16 = 16 output columns, n8 = 8 images, k8 = 8 input columns)
//   A_d[i, k]  = tf32(f[kh, 8 d + k - col(i) - s0])  (0 outside [0, KW))   Toeplitz block of offset d
//   B_kc[k, n] = tf32(x[n0 + n, c, oh - pt + kh, c0 + 8 kc + k])          staged input rows (zero outside)
// with output column ow0 + 16 ob + col(i), col(i) = 2 (i % 8) + i / 8, chunk kc = 2 ob + d (an output block is
// two 8-column chunks), c0 = ow0 - pl - s0, s0 = (ow0 - pl) mod 8 (tm_s0), d in [0, nd), nd = (KW + 22 + s0) / 8.
//
// PTX m16n8k8 .tf32 fragments (g = lane / 4, t = lane % 4):
//   A: a0 (row g, k t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)   -> filter words x0, x0 - 1, x0 + 4,
//      x0 + 3 of the zero-padded row Fe, x0 = 8 d + t - 2 g - s0 + TF_FO: four LDS.32 (18 distinct consecutive
//      words per warp access: conflict-free)
//   B: b0 (k t, n g), b1 (k t + 4, n g)   -> image g's staged row at columns 8 kc + t, + 4: one ldmatrix.x4 (b16)
//      per chunk gives b0/b1 for both rows of the output-row pair (an 8 x 16-byte matrix is 8 images x 4 fp32;
//      lane T receives row T / 4, word T % 4: exactly b0's layout).  Byte-for-byte the 16-bit kernel's
//      ldmatrix addressing (a chunk is 32 bytes in both).
//   C: c0, c1 (row g, n 2t, 2t + 1), c2, c3 (row g + 8, ...)   -> image 2 t + e, columns 2 g (c[e]), 2 g + 1
//      (c[2 + e]) as in the 16-bit epilogue.
// Rounding (cvt.rna.tf32.f32: round to nearest, ties away from zero, low 13 bits zero) happens once per element:
// the filter when Fe is written (scalar loads), x in the staging (scalar path) or in one in-place pass over the
// thread's own cp.async vectors after cp.async.wait (vector path); the loop feeds the words to the mma as they are.
//
// CTA = TF_WARPS = 8 warps, tile = 8 images x bm output rows x 16 NB columns of one channel; bm = all output
// rows (even) if the tile fits the per-block opt-in (one CTA of 8 warps per SM), halved until it does.  32-bit
// staging needs twice the 16-bit kernel's bytes per element, and nd is twice as large in chunks of half the
// width: nch = 2 NB - 2 + ngrp DG chunks per staged row.  Image pitch ip = rows * xc + 4 floats (an odd number of
// 16-byte units: the 8 row addresses of one ldmatrix matrix fall on distinct bank groups).
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "dwconv_launch.h"
#include "dwconv_convert.cuh"
#include "dwconv_mma.cuh"

namespace lkconv {

constexpr int TF_FO = 22;      // filter-row offset: the A words read kw in [-22, 8 * DG * ngrp + 1]
constexpr int TF_MAX_K = 64;
constexpr int TF_WARPS = 8;
constexpr int TF_IMG = 8;      // images per CTA: the mma n8 dimension

struct TfLayout {
  int s0, nd, ngrp, nch, xc, rows, ip, fp, z_off, fe_off, bytes;  // offsets in floats
};
__host__ __device__ __forceinline__ int tf_s0(int64_t pl) { return (int)(((-pl) % 8 + 8) % 8); }
__host__ __device__ __forceinline__ TfLayout tf_layout(int KH, int KW, int H, int s0, int NB, int DG, int bm) {
  TfLayout L;
  L.s0 = s0;
  L.nd = (KW + 15 + s0 + 7) / 8;           // Toeplitz offsets d (8-column chunks) that meet [0, KW)
  L.ngrp = (L.nd + DG - 1) / DG;
  L.nch = 2 * NB - 2 + L.ngrp * DG;        // chunks staged per row: kc = 2 ob + DG grp + dd
  L.xc = 8 * L.nch;
  L.rows = H < bm + KH - 1 ? H : bm + KH - 1;
  L.ip = L.rows * L.xc + 4;                // 16 (2m + 1) bytes
  L.z_off = TF_IMG * L.ip;                 // the zero row (xc floats)
  L.fp = round_up_i(8 * L.ngrp * DG + 24, 8);
  L.fe_off = round_up_i(L.z_off + L.xc, 32);
  L.bytes = (L.fe_off + KH * L.fp) * 4;
  return L;
}

template <int NB, int DG>
__global__ void __launch_bounds__(32 * TF_WARPS, 1) toeplitz_tf32_kernel(ConvArgs a, int vec_x, int bm) {
  constexpr int BN = 16 * NB, NCH = 2 * NB - 2 + DG, THREADS = 32 * TF_WARPS;
  extern __shared__ __align__(128) unsigned char smem_tf[];
  const int KH = (int)a.KH, KW = (int)a.KW, H = (int)a.H, W = (int)a.W, Ho = (int)a.Ho, Wo = (int)a.Wo;
  const int N = (int)a.N, C = (int)a.C, pt = (int)a.pt;
  const TfLayout L = tf_layout(KH, KW, H, tf_s0(a.pl), NB, DG, bm);
  float* Xs = reinterpret_cast<float*>(smem_tf);
  float* Fe = Xs + L.fe_off;
  const int c = (int)(blockIdx.x % (unsigned)C);
  const int n0 = (int)(blockIdx.x / (unsigned)C) * TF_IMG;
  const int ow0 = (int)blockIdx.y * BN, oh0 = (int)blockIdx.z * bm;
  const int c0 = ow0 - (int)a.pl - L.s0;   // a multiple of 8
  const int ih_lo = oh0 - pt > 0 ? oh0 - pt : 0;
  const int ih_end = oh0 + bm - 1 - pt + KH;
  const int ih_hi = ih_end < H ? ih_end : H;
  const float* __restrict__ xch = static_cast<const float*>(a.x) + c * a.xs[1];
  const float* __restrict__ wc = static_cast<const float*>(a.w) + c * a.KH * a.KW;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  {  // stage x: per image, warp-strided rows, lane-strided vectors (no division); a vector never straddles column 0
    const int ve = vec_x;
    for (int img = 0; img < TF_IMG && n0 + img < N; ++img) {
      const float* xi = xch + (int64_t)(n0 + img) * a.xs[0];
      for (int r = warp; r < ih_hi - ih_lo; r += TF_WARPS) {
        const float* xr = xi + (int64_t)(ih_lo + r) * a.xs[2];
        float* drow = Xs + img * L.ip + r * L.xc;
        for (int j = lane * ve; j < L.xc; j += 32 * ve) {
          const int col = c0 + j;
          const int cnt = (col >= 0 && col < W) ? (W - col < ve ? W - col : ve) : 0;
          if (ve == 1) {
            drow[j] = cnt ? to_tf32(xr[(int64_t)col * a.xs[3]]) : 0.f;
          } else {
            cp_async_zfill(drow + j, cnt ? xr + col : xr, ve * 4, cnt * 4);
          }
        }
      }
    }
    for (int j = threadIdx.x; j < L.xc; j += THREADS) Xs[L.z_off + j] = 0.f;
    // filter rows, rounded to TF32 once, zero-padded by TF_FO on the left and to fp on the right
    for (int kh = warp; kh < KH; kh += TF_WARPS)
      for (int u = lane; u < L.fp; u += 32) {
        const int kw = u - TF_FO;
        Fe[kh * L.fp + u] = (kw >= 0 && kw < KW) ? to_tf32(wc[kh * KW + kw]) : 0.f;
      }
    cp_async_wait_all();
    if (ve > 1) {  // round the thread's own cp.async vectors in place (visible to it after the wait)
      for (int img = 0; img < TF_IMG && n0 + img < N; ++img)
        for (int r = warp; r < ih_hi - ih_lo; r += TF_WARPS) {
          float* drow = Xs + img * L.ip + r * L.xc;
          for (int j = lane * ve; j < L.xc; j += 32 * ve) {
            if (ve == 4) {
              float4 v = *reinterpret_cast<float4*>(drow + j);
              v.x = to_tf32(v.x); v.y = to_tf32(v.y); v.z = to_tf32(v.z); v.w = to_tf32(v.w);
              *reinterpret_cast<float4*>(drow + j) = v;
            } else {
              float2 v = *reinterpret_cast<float2*>(drow + j);
              v.x = to_tf32(v.x); v.y = to_tf32(v.y);
              *reinterpret_cast<float2*>(drow + j) = v;
            }
          }
        }
    }
  }
  __syncthreads();

  const int g4 = lane >> 2, t4 = lane & 3;
  const uint32_t* F32 = reinterpret_cast<const uint32_t*>(Fe);
  const int xoff = t4 - 2 * g4 - L.s0 + TF_FO;  // a0's word in a filter row at d = 0 (>= 22 - 14 - 7 = 1)
  // ldmatrix lane roles: matrix lane/8 = (row of the pair lane/16, k half (lane/8)&1), row lane&7 = image
  const int limg = lane & 7, lrow = lane >> 4, lkh = (lane >> 3) & 1;
  const bool limg_ok = n0 + limg < N;
  const uint32_t xs_u32 = smem_u32(Xs);
  const uint32_t zaddr = xs_u32 + (uint32_t)((L.z_off + 4 * lkh) * 4);
  const float bias = a.bias != nullptr ? static_cast<const float*>(a.bias)[c] : 0.f;
  float* __restrict__ yc = static_cast<float*>(a.y) + c * a.ys[1];
  // two adjacent outputs as one 64-bit store: unit column stride, even row / image strides, 8-byte aligned plane
  const bool pair_store = a.ys[3] == 1 && (a.ys[2] & 1) == 0 && (a.ys[0] & 1) == 0 &&
                          (reinterpret_cast<uintptr_t>(yc) & 7) == 0;
  const int rows_here = Ho - oh0 < bm ? Ho - oh0 : bm;
  const int npairs = (rows_here + 1) >> 1;

  for (int p = warp; p < npairs; p += TF_WARPS) {
    const int oha = oh0 + 2 * p;
    const bool lok = limg_ok && oha + lrow < Ho;
    const int ih0 = oha + lrow - pt;  // this lane's input row at kh = 0
    const uint32_t rbase = xs_u32 + (uint32_t)((limg * L.ip + (ih0 - ih_lo) * L.xc + 4 * lkh) * 4);
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
        const int col = c0 + 8 * (DG * g + j);
        if (col + 7 >= 0 && col < W) live |= 1u << j;
      }
      if (live == 0) continue;
      for (int kh = kh_lo; kh < kh_hi; ++kh) {
        const bool ok = lok && (unsigned)(ih0 + kh) < (unsigned)H;
        const uint32_t xa = (ok ? rbase + (uint32_t)(kh * L.xc * 4) : zaddr) + (uint32_t)(32 * DG * g);
        const int aoff = kh * L.fp + 8 * DG * g + xoff;
        uint32_t af[DG][4];
#pragma unroll
        for (int dd = 0; dd < DG; ++dd) {
          af[dd][0] = F32[aoff + 8 * dd];
          af[dd][1] = F32[aoff + 8 * dd - 1];
          af[dd][2] = F32[aoff + 8 * dd + 4];
          af[dd][3] = F32[aoff + 8 * dd + 3];
        }
#pragma unroll
        for (int j = 0; j < NCH; ++j) {
          if (!((live >> j) & 1u)) continue;
          uint32_t bf[4];
          ldmatrix_x4(bf, xa + 32 * j);
#pragma unroll
          for (int ob = 0; ob < NB; ++ob) {
            const int dd = j - 2 * ob;
            if (dd < 0 || dd >= DG) continue;  // static
            MmaOp<float>::run(acc[0][ob], af[dd], bf[0], bf[1]);
            MmaOp<float>::run(acc[1][ob], af[dd], bf[2], bf[3]);
          }
        }
      }
    }

    const int col0 = ow0 + 2 * g4;  // even
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int img = n0 + 2 * t4 + e;
        if (img >= N || oha + h >= Ho) continue;
        float* yr = yc + (int64_t)img * a.ys[0] + (int64_t)(oha + h) * a.ys[2] + (int64_t)col0 * a.ys[3];
#pragma unroll
        for (int ob = 0; ob < NB; ++ob) {
          const int ow = col0 + 16 * ob;
          if (ow >= Wo) continue;
          const float v0 = acc[h][ob][e] + bias, v1 = acc[h][ob][2 + e] + bias;
          if (pair_store && ow + 1 < Wo) {
            *reinterpret_cast<float2*>(yr + 16 * ob) = make_float2(v0, v1);
          } else {
            float* q = yr + 16 * ob * a.ys[3];
            q[0] = v0;
            if (ow + 1 < Wo) q[a.ys[3]] = v1;
          }
        }
      }
  }
}

namespace {

// (NB, DG): NB = 16-column output blocks per CTA (2 for Wo <= 32, else 4); DG = Toeplitz offsets per group, 6
// where nd mod 6 is 0 or 5 (one group for the RepLKNet kernels, nd = 6), else 4: at most 3 all-zero offsets
struct TfConfig {
  int nb, dg;
};
inline TfConfig toeplitz_tf32_config(int64_t Wo, int64_t KW, int64_t pl) {
  const int nd = (int)((KW + 15 + tf_s0(pl) + 7) / 8);
  return TfConfig{Wo <= 32 ? 2 : 4, (nd % 6 == 0 || nd % 6 == 5) ? 6 : 4};
}

// output rows per CTA: all of them (even) if the tile fits the per-block opt-in, else halved until it does
inline int toeplitz_tf32_rows(const ConvArgs& a, int nb, int dg) {
  const int s0 = tf_s0(a.pl);
  auto bytes = [&](int bm) { return tf_layout((int)a.KH, (int)a.KW, (int)a.H, s0, nb, dg, bm).bytes; };
  int bm = (int)round_up_i((int)a.Ho, 2);
  while (bm > 2 && bytes(bm) > a.max_smem_optin) bm = round_up_i(bm / 2, 2);
  return bytes(bm) <= a.max_smem_optin ? bm : 0;
}

bool tf_grid_ok(int64_t gx, int64_t gy, int64_t gz) {
  return gx >= 1 && gx <= kMaxGridX && gy >= 1 && gy <= kMaxGridYZ && gz >= 1 && gz <= kMaxGridYZ;
}

template <int NB, int DG>
bool launch_toeplitz_tf32_cfg(const ConvArgs& a, cudaStream_t stream) {
  const int bm = toeplitz_tf32_rows(a, NB, DG);
  if (bm == 0) return false;
  const TfLayout L = tf_layout((int)a.KH, (int)a.KW, (int)a.H, tf_s0(a.pl), NB, DG, bm);
  const int64_t gx = a.C * ceil_div(a.N, TF_IMG), gy = ceil_div(a.Wo, 16 * NB), gz = ceil_div(a.Ho, bm);
  if (!tf_grid_ok(gx, gy, gz)) return false;
  const int vec_x = vec_elems(a.x, a.xs, 4, a.sm_major);  // c0 is a multiple of 8 >= any vector width
  if (L.bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(toeplitz_tf32_kernel<NB, DG>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        L.bytes));
  }
  toeplitz_tf32_kernel<NB, DG>
      <<<dim3((unsigned)gx, (unsigned)gy, (unsigned)gz), 32 * TF_WARPS, (size_t)L.bytes, stream>>>(a, vec_x, bm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// 32-bit ints inside the kernel: sizes and paddings below 2^30 (else the IEEE kernels)
inline bool toeplitz_tf32_fits(const ConvArgs& a) {
  const int64_t lim = int64_t(1) << 30;
  return a.N < lim && a.C < lim && a.H < lim && a.W < lim && a.Ho < lim && a.Wo < lim && a.pt < lim && a.pt > -lim &&
         a.pl < lim && a.pl > -lim;
}

}  // namespace

bool try_toeplitz_tf32(const ConvArgs& a, cudaStream_t stream) {
  if (!a.allow_tf32 || a.dtype != DType::kFloat32 || a.sm_major < 8) return false;
  if (a.sh != 1 || a.sw != 1 || a.dil_h != 1 || a.dil_w != 1) return false;
  if (a.KH > TF_MAX_K || a.KW > TF_MAX_K || !toeplitz_tf32_fits(a)) return false;
  const TfConfig t = toeplitz_tf32_config(a.Wo, a.KW, a.pl);
  if (t.nb == 2) return t.dg == 6 ? launch_toeplitz_tf32_cfg<2, 6>(a, stream) : launch_toeplitz_tf32_cfg<2, 4>(a, stream);
  return t.dg == 6 ? launch_toeplitz_tf32_cfg<4, 6>(a, stream) : launch_toeplitz_tf32_cfg<4, 4>(a, stream);
}

}  // namespace lkconv
