// Warp-level tensor-core and async-copy helpers shared by the fast kernels (inline PTX, sm80+):
// ldmatrix.x4, mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate), cp.async with zero-fill, and the
// host-side choice of the cp.async vector width.  On older architectures the device helpers trap
// (the launchers never select these kernels there).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace lkconv {

__host__ __device__ __forceinline__ int round_up_i(int v, int m) { return (v + m - 1) / m * m; }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async of `bytes` (4, 8 or 16) with zero-fill of the last bytes - src_bytes
__device__ __forceinline__ void cp_async_zfill(void* dst, const void* src, int bytes, int src_bytes) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  const uint32_t d = smem_u32(dst);
  if (bytes == 16)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
  else if (bytes == 8)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

template <typename T> struct MmaOp;
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

// float: TF32 tensor cores, mma.sync.m16n8k8 (fp32 data that the kernel rounded to TF32 with to_tf32; A = 4, B = 2
// 32-bit registers: a 32-byte k16 step of 16-bit operands is a k8 step of floats, with the same ldmatrix addressing)
template <> struct MmaOp<float> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

// cvt.rna.tf32.f32: round to nearest (ties away from zero) on the 13 dropped mantissa bits, as a float
__device__ __forceinline__ float to_tf32(float v) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return __uint_as_float(r);
#else
  return v;
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

// the widest cp.async (16, 8, 4 bytes) that every staged vector of a tensor meets: unit column stride, aligned
// base pointer, row / channel / image strides multiples of the vector, starting columns multiples of the
// vector (the kernels' responsibility); 1 = scalar loads
inline int vec_elems(const void* p, const int64_t* st, int esz, int sm_major) {
  if (st[3] != 1 || sm_major < 8) return 1;
  for (int bytes = 16; bytes >= 4; bytes /= 2) {
    const int ve = bytes / esz;
    if (ve < 2) break;
    if (reinterpret_cast<uintptr_t>(p) % bytes == 0 && st[0] % ve == 0 && st[1] % ve == 0 && st[2] % ve == 0) return ve;
  }
  return 1;
}

}  // namespace lkconv
