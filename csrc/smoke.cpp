// C++ smoke test for the lkconv CUDA kernels outside Python/setuptools (built by CMakeLists.txt).
//   ./lkconv_smoke        -> checks the lkconv_cuda ops are registered; with a GPU also runs every pass
//                            on a small problem against a plain CPU loop and prints the max errors.
// Exit code 0 = OK.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cmath>
#include <cstdio>
#include <optional>

using ForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::IntArrayRef,
                         c10::IntArrayRef, c10::IntArrayRef, int64_t);
using GradInFn = at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                            c10::IntArrayRef, c10::IntArrayRef, int64_t);
using GradWFn = at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                           c10::IntArrayRef, int64_t);

// y = depthwise conv (stride 1, dilation 1, padding pt/pl, output Ho x Wo), double precision CPU loop
static at::Tensor cpu_conv(const at::Tensor& x, const at::Tensor& w, int64_t pt, int64_t pl, int64_t Ho, int64_t Wo) {
  auto xd = x.to(at::kDouble).cpu().contiguous(), wd = w.to(at::kDouble).cpu().contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), KH = w.size(2), KW = w.size(3);
  auto y = at::zeros({N, C, Ho, Wo}, at::kDouble);
  auto X = xd.accessor<double, 4>();
  auto Wt = wd.accessor<double, 4>();
  auto Y = y.accessor<double, 4>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          double s = 0;
          for (int64_t a = 0; a < KH; ++a)
            for (int64_t b = 0; b < KW; ++b) {
              const int64_t ih = i - pt + a, iw = j - pl + b;
              if (ih >= 0 && ih < H && iw >= 0 && iw < W) s += X[n][c][ih][iw] * Wt[c][0][a][b];
            }
          Y[n][c][i][j] = s;
        }
  return y;
}

int main() {
  auto& d = c10::Dispatcher::singleton();
  for (const char* name : {"lkconv_cuda::forward", "lkconv_cuda::grad_input", "lkconv_cuda::grad_weight"}) {
    auto h = d.findSchema({name, ""});
    if (!h) {
      std::fprintf(stderr, "FAIL: %s is not registered (library not linked?)\n", name);
      return 1;
    }
    std::printf("registered: %s\n", c10::toString(h->schema()).c_str());
  }
  auto forward = d.findSchemaOrThrow("lkconv_cuda::forward", "").typed<ForwardFn>();
  auto gin = d.findSchemaOrThrow("lkconv_cuda::grad_input", "").typed<GradInFn>();
  auto gw = d.findSchemaOrThrow("lkconv_cuda::grad_weight", "").typed<GradWFn>();

  bool threw = false;
  try {
    forward.call(at::zeros({1, 1, 3, 3}), at::zeros({1, 1, 3, 3}), std::nullopt, {1, 1}, {1, 1, 1, 1}, {1, 1}, 0);
  } catch (const c10::Error&) {
    threw = true;
  }
  if (!threw) {
    std::fprintf(stderr, "FAIL: lkconv_cuda::forward accepted CPU tensors\n");
    return 1;
  }
  if (c10::cuda::device_count() == 0) {
    std::printf("no CUDA device: registration checks passed, kernels not run\n");
    return 0;
  }
  int failures = 0;
  const int64_t N = 2, C = 3, H = 20, W = 37, K = 13, p = 6;
  for (auto dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (int64_t algo : {0, 1}) {
      auto opts = at::TensorOptions().device(at::kCUDA).dtype(dt);
      auto x = at::randn({N, C, H, W}, opts);
      auto w = (at::randn({C, 1, K, K}, opts) / (double)K);
      auto g = at::randn({N, C, H, W}, opts);
      auto y = forward.call(x, w, std::nullopt, {1, 1}, {p, p, p, p}, {1, 1}, algo);
      auto gx = gin.call(g, w, {N, C, H, W}, {1, 1}, {p, p, p, p}, {1, 1}, algo);
      auto dw = gw.call(g, x, {C, 1, K, K}, {1, 1}, {p, p, p, p}, {1, 1}, algo);
      auto y_ref = cpu_conv(x, w, p, p, H, W);
      auto gx_ref = cpu_conv(g, w.flip({2, 3}), K - 1 - p, K - 1 - p, H, W);
      // dW[c, a, b] = sum x[n, c, i - p + a, j - p + b] * g[n, c, i, j]: correlate x with g
      auto dw_ref = at::zeros({C, 1, K, K}, at::kDouble);
      {
        auto xd = x.to(at::kDouble).cpu(), gd = g.to(at::kDouble).cpu();
        auto X = xd.accessor<double, 4>();
        auto G = gd.accessor<double, 4>();
        auto R = dw_ref.accessor<double, 4>();
        for (int64_t c = 0; c < C; ++c)
          for (int64_t a = 0; a < K; ++a)
            for (int64_t b = 0; b < K; ++b) {
              double s = 0;
              for (int64_t n = 0; n < N; ++n)
                for (int64_t i = 0; i < H; ++i)
                  for (int64_t j = 0; j < W; ++j) {
                    const int64_t ih = i - p + a, iw = j - p + b;
                    if (ih >= 0 && ih < H && iw >= 0 && iw < W) s += X[n][c][ih][iw] * G[n][c][i][j];
                  }
              R[c][0][a][b] = s;
            }
      }
      const double tol = dt == at::kFloat ? 1e-4 : (dt == at::kHalf ? 2e-2 : 1.5e-1);
      const double e1 = (y.to(at::kDouble).cpu() - y_ref).abs().max().item<double>();
      const double e2 = (gx.to(at::kDouble).cpu() - gx_ref).abs().max().item<double>();
      const double scale = std::max(1.0, dw_ref.abs().max().item<double>());
      const double e3 = (dw.to(at::kDouble).cpu() - dw_ref).abs().max().item<double>() / scale;
      const bool ok = e1 <= tol && e2 <= tol && e3 <= tol;
      failures += !ok;
      std::printf("%-9s algo=%lld  forward %.2e  grad_input %.2e  grad_weight(rel) %.2e  %s\n",
                  c10::toString(dt), (long long)algo, e1, e2, e3, ok ? "ok" : "FAIL");
    }
  }
  return failures == 0 ? 0 : 1;
}
