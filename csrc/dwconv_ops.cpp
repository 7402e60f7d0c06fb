// lkconv CUDA backend: host code.  Argument checks, device guard, current stream, dispatch to the
// launchers in dwconv_forward.cu / dwconv_grad_weight.cu, and the op registration:
//
//   lkconv_cuda::forward(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int algo=0) -> Tensor
//   lkconv_cuda::grad_input(Tensor grad_out, Tensor weight, int[] input_size, int[] stride, int[] padding, int[] dilation, int algo=0) -> Tensor
//   lkconv_cuda::grad_weight(Tensor grad_out, Tensor x, int[] weight_size, int[] stride, int[] padding, int[] dilation, int algo=0) -> Tensor
//
// padding = (top, bottom, left, right); stride, dilation = (h, w).  algo: 0 = fastest supported
// kernel (fp32: IEEE), 1 = the generic kernel only (for testing the fast kernels against it), 2 = as 0 but fp32
// forward / grad_input may use TF32 tensor cores (what lkconv passes when PyTorch allows TF32 for convolutions;
// grad_weight treats 2 as 0).
// Implementations are registered for the CUDA dispatch key only: calling with CPU tensors raises
// PyTorch's "Could not run ... with arguments from the 'CPU' backend" error.
#ifdef LKCONV_PYTHON_MODULE
#include <Python.h>
#endif

#include <cstdlib>
#include <cstring>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dwconv_launch.h"

namespace lkconv {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "lkconv_cuda: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "lkconv_cuda: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "lkconv_cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, "lkconv_cuda: ", name, " must be a strided (dense) tensor");
}

struct Geom {
  int64_t sh, sw, pt, pb, pl, pr, dil_h, dil_w;
};

Geom geom(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2, "lkconv_cuda: stride must have 2 values (h, w), got ", stride);
  TORCH_CHECK(padding.size() == 4, "lkconv_cuda: padding must have 4 values (top, bottom, left, right), got ", padding);
  TORCH_CHECK(dilation.size() == 2, "lkconv_cuda: dilation must have 2 values (h, w), got ", dilation);
  constexpr int64_t kMax = kMaxGeometry;  // 2^30
  for (auto v : stride) TORCH_CHECK(v >= 1 && v <= kMax, "lkconv_cuda: stride must be in [1, 2^30], got ", stride);
  for (auto v : dilation) TORCH_CHECK(v >= 1 && v <= kMax, "lkconv_cuda: dilation must be in [1, 2^30], got ", dilation);
  for (auto v : padding) TORCH_CHECK(v >= 0 && v <= kMax, "lkconv_cuda: padding must be in [0, 2^30], got ", padding);
  return Geom{stride[0], stride[1], padding[0], padding[1], padding[2], padding[3], dilation[0], dilation[1]};
}

void check_kernel_size(int64_t KH, int64_t KW) {
  TORCH_CHECK(KH >= 1 && KW >= 1, "lkconv_cuda: kernel size must be >= 1, got ", KH, "x", KW);
  TORCH_CHECK(KH <= kMaxKernelSide && KW <= kMaxKernelSide && KH * KW <= kMaxKernelTaps,
              "lkconv_cuda: kernel size too large: ", KH, "x", KW);
}

// (Ho, Wo) of a forward conv on (H, W)
std::pair<int64_t, int64_t> out_size(int64_t H, int64_t W, int64_t KH, int64_t KW, const Geom& g) {
  const int64_t ho = (H + g.pt + g.pb - g.dil_h * (KH - 1) - 1);
  const int64_t wo = (W + g.pl + g.pr - g.dil_w * (KW - 1) - 1);
  // floor division (the numerator may be negative for an invalid geometry)
  auto fdiv = [](int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
  return {fdiv(ho, g.sh) + 1, fdiv(wo, g.sw) + 1};
}

at::MemoryFormat format_of(const at::Tensor& t) {
  // channels_last iff channels_last-contiguous and not NCHW-contiguous: the C++ copy of
  // lkconv/backends/base.py output_memory_format (tests/test_backend_cuda.py checks they agree)
  if (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// LKCONV_POISON_OUTPUTS=1 (read at every call, like lkconv/backends/base.py poison_outputs): fill
// the buffers the kernels write with NaN first, so an unwritten tile shows in the comparison with the
// reference.  Debug / first-GPU-run mode; off by default.
at::Tensor poisoned(at::Tensor t) {
  const char* v = std::getenv("LKCONV_POISON_OUTPUTS");
  if (v != nullptr && std::strcmp(v, "1") == 0 && t.numel() > 0) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

void fill_device(ConvArgs& a, const at::Tensor& t) {
  const auto* prop = at::cuda::getDeviceProperties(t.device().index());
  a.sm_major = prop->major;
  a.max_smem_optin = (int)prop->sharedMemPerBlockOptin;
}

void set_strides(int64_t* dst, const at::Tensor& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

at::Tensor check_weight(const at::Tensor& weight, int64_t C, const at::Tensor& like, const char* like_name) {
  check_cuda(weight, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1,
              "lkconv_cuda: weight must have shape (C, 1, KH, KW) with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == like.scalar_type(), "lkconv_cuda: weight dtype (", weight.scalar_type(),
              ") must match ", like_name, " dtype (", like.scalar_type(), ")");
  TORCH_CHECK(weight.device() == like.device(), "lkconv_cuda: weight is on ", weight.device(), " but ", like_name,
              " is on ", like.device());
  check_kernel_size(weight.size(2), weight.size(3));
  return weight.contiguous();
}

}  // namespace

at::Tensor dwconv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t algo) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 4, "lkconv_cuda: x must be 4-D (N, C, H, W), got shape ", x.sizes());
  const DType dt = dtype_of(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C >= 1, "lkconv_cuda: x must have at least one channel, got shape ", x.sizes());
  TORCH_CHECK(N == 0 || (H >= 1 && W >= 1), "lkconv_cuda: x spatial size must be >= 1, got shape ", x.sizes());
  TORCH_CHECK(algo >= 0 && algo <= 2, "lkconv_cuda: algo must be 0 (fastest), 1 (generic) or 2 (fastest, TF32 allowed), got ", algo);
  const at::Tensor w = check_weight(weight, C, x, "x");
  const Geom g = geom(stride, padding, dilation);
  const int64_t KH = w.size(2), KW = w.size(3);
  const auto [Ho, Wo] = out_size(H, W, KH, KW, g);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "lkconv_cuda: output size would be ", Ho, "x", Wo, " for input ", H, "x", W,
              ", kernel ", KH, "x", KW, ", padding ", padding, ", stride ", stride, ", dilation ", dilation);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_cuda(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, "lkconv_cuda: bias must have shape (C,) = (", C, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "lkconv_cuda: bias dtype (", bias->scalar_type(),
                ") must match x dtype (", x.scalar_type(), ")");
    TORCH_CHECK(bias->device() == x.device(), "lkconv_cuda: bias is on ", bias->device(), " but x is on ", x.device());
    b = bias->contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = poisoned(at::empty({N, C, Ho, Wo}, x.options().memory_format(format_of(x))));
  if (y.numel() == 0) return y;

  ConvArgs a;
  a.x = x.data_ptr();
  a.w = w.data_ptr();
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.N = N; a.C = C; a.H = H; a.W = W; a.Ho = Ho; a.Wo = Wo; a.KH = KH; a.KW = KW;
  a.sh = g.sh; a.sw = g.sw; a.dil_h = g.dil_h; a.dil_w = g.dil_w; a.pt = g.pt; a.pl = g.pl;
  set_strides(a.xs, x);
  set_strides(a.ys, y);
  a.dtype = dt;
  fill_device(a, x);
  a.allow_tf32 = algo == 2;
  launch_forward(a, algo == 1, at::cuda::getCurrentCUDAStream());
  return y;
}

at::Tensor dwconv_grad_input(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t algo) {
  check_cuda(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 4, "lkconv_cuda: grad_out must be 4-D, got shape ", grad_out.sizes());
  const DType dt = dtype_of(grad_out, "grad_out");
  TORCH_CHECK(input_size.size() == 4, "lkconv_cuda: input_size must have 4 values (N, C, H, W), got ", input_size);
  TORCH_CHECK(algo >= 0 && algo <= 2, "lkconv_cuda: algo must be 0 (fastest), 1 (generic) or 2 (fastest, TF32 allowed), got ", algo);
  const int64_t N = input_size[0], C = input_size[1], H = input_size[2], W = input_size[3];
  TORCH_CHECK(N >= 0 && C >= 1 && H >= 0 && W >= 0, "lkconv_cuda: invalid input_size ", input_size);
  TORCH_CHECK(N == 0 || (H >= 1 && W >= 1), "lkconv_cuda: input spatial size must be >= 1, got ", input_size);
  const at::Tensor w = check_weight(weight, C, grad_out, "grad_out");
  const Geom g = geom(stride, padding, dilation);
  const int64_t KH = w.size(2), KW = w.size(3);
  const auto [Ho, Wo] = out_size(H, W, KH, KW, g);
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(1) == C && grad_out.size(2) == Ho && grad_out.size(3) == Wo,
              "lkconv_cuda: grad_out must have shape (", N, ", ", C, ", ", Ho, ", ", Wo, ") for input_size ", input_size,
              ", got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor gx = poisoned(at::empty({N, C, H, W}, grad_out.options().memory_format(format_of(grad_out))));
  if (gx.numel() == 0) return gx;

  ConvArgs a;
  a.x = grad_out.data_ptr();
  a.y = gx.data_ptr();
  a.N = N; a.C = C; a.KH = KH; a.KW = KW; a.dil_h = g.dil_h; a.dil_w = g.dil_w;
  set_strides(a.xs, grad_out);
  set_strides(a.ys, gx);
  a.dtype = dt;
  fill_device(a, grad_out);
  a.allow_tf32 = algo == 2;  // the stride-1 path below: the forward's kernels, so TF32 as in the forward
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (g.sh == 1 && g.sw == 1) {
    // gx = conv(grad_out, flip(w)) with stride 1, padding top' = dil_h*(KH-1) - pt (may be negative), same dilation
    const at::Tensor wf = w.flip({2, 3}).contiguous();
    a.w = wf.data_ptr();
    a.H = Ho; a.W = Wo; a.Ho = H; a.Wo = W;
    a.pt = g.dil_h * (KH - 1) - g.pt;
    a.pl = g.dil_w * (KW - 1) - g.pl;
    launch_forward(a, algo == 1, stream);
  } else {
    a.w = w.data_ptr();
    a.H = H; a.W = W; a.Ho = Ho; a.Wo = Wo;
    a.sh = g.sh; a.sw = g.sw; a.pt = g.pt; a.pl = g.pl;
    launch_grad_input_strided(a, algo == 1, stream);
  }
  return gx;
}

at::Tensor dwconv_grad_weight(const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef weight_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t algo) {
  check_cuda(grad_out, "grad_out");
  check_cuda(x, "x");
  TORCH_CHECK(algo >= 0 && algo <= 2, "lkconv_cuda: algo must be 0 (fastest), 1 (generic) or 2 (fastest, TF32 allowed), got ", algo);
  TORCH_CHECK(x.dim() == 4, "lkconv_cuda: x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(grad_out.dim() == 4, "lkconv_cuda: grad_out must be 4-D, got shape ", grad_out.sizes());
  const DType dt = dtype_of(x, "x");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "lkconv_cuda: grad_out dtype (", grad_out.scalar_type(),
              ") must match x dtype (", x.scalar_type(), ")");
  TORCH_CHECK(grad_out.device() == x.device(), "lkconv_cuda: grad_out is on ", grad_out.device(), " but x is on ",
              x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C >= 1, "lkconv_cuda: x must have at least one channel, got shape ", x.sizes());
  TORCH_CHECK(N == 0 || (H >= 1 && W >= 1), "lkconv_cuda: x spatial size must be >= 1, got shape ", x.sizes());
  TORCH_CHECK(weight_size.size() == 4 && weight_size[0] == C && weight_size[1] == 1,
              "lkconv_cuda: weight_size must be (C, 1, KH, KW) with C = ", C, ", got ", weight_size);
  const int64_t KH = weight_size[2], KW = weight_size[3];
  check_kernel_size(KH, KW);
  const Geom g = geom(stride, padding, dilation);
  const auto [Ho, Wo] = out_size(H, W, KH, KW, g);
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(1) == C && grad_out.size(2) == Ho && grad_out.size(3) == Wo,
              "lkconv_cuda: grad_out must have shape (", N, ", ", C, ", ", Ho, ", ", Wo, ") for x of shape ", x.sizes(),
              ", got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_w = poisoned(at::empty({C, 1, KH, KW}, x.options()));

  GradWeightArgs a;
  a.x = x.data_ptr();
  a.g = grad_out.data_ptr();
  a.grad_w = grad_w.data_ptr();
  a.N = N; a.C = C; a.H = H; a.W = W; a.Ho = Ho; a.Wo = Wo; a.KH = KH; a.KW = KW;
  a.sh = g.sh; a.sw = g.sw; a.dil_h = g.dil_h; a.dil_w = g.dil_w; a.pt = g.pt; a.pl = g.pl;
  set_strides(a.xs, x);
  set_strides(a.gs, grad_out);
  a.dtype = dt;
  a.sm_major = at::cuda::getDeviceProperties(x.device().index())->major;
  a.max_smem_optin = (int)at::cuda::getDeviceProperties(x.device().index())->sharedMemPerBlockOptin;
  fill_grad_weight_vectors(a);
  const int64_t splits = N > 0 ? grad_weight_splits(a, algo == 1) : 1;
  at::Tensor partial = poisoned(at::empty({splits, C, KH * KW}, x.options().dtype(at::kFloat)));
  a.partial = partial.data_ptr<float>();
  a.splits = splits;
  launch_grad_weight(a, algo == 1, at::cuda::getCurrentCUDAStream());
  return grad_w;
}

}  // namespace lkconv

TORCH_LIBRARY(lkconv_cuda, m) {
  m.def("forward(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int algo=0) -> Tensor");
  m.def("grad_input(Tensor grad_out, Tensor weight, int[] input_size, int[] stride, int[] padding, int[] dilation, "
        "int algo=0) -> Tensor");
  m.def("grad_weight(Tensor grad_out, Tensor x, int[] weight_size, int[] stride, int[] padding, int[] dilation, "
        "int algo=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(lkconv_cuda, CUDA, m) {
  m.impl("forward", &lkconv::dwconv_forward);
  m.impl("grad_input", &lkconv::dwconv_grad_input);
  m.impl("grad_weight", &lkconv::dwconv_grad_weight);
}

#ifdef LKCONV_PYTHON_MODULE
// `import lkconv._C` loads this library (and so registers the ops); the module itself is empty.
static PyModuleDef lkconv_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "lkconv CUDA extension: registers torch.ops.lkconv_cuda.*", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lkconv_c_module); }
#endif
