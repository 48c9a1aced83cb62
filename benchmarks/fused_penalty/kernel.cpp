// A fused EWC penalty for contiguous float32 CPU tensors: the least work any implementation of
// the penalty can do, built only by `python -m benchmarks.penalty_speed --fused-floor` to
// measure that floor. Not part of the library (which needs no compiler).
//
//   add_grad:    G += lam * A * (T - M)                      reads T, M, A, G once; writes G
//   weighted:    W  = lam * A * (T - M); returns 0.5 * sum W * (T - M)
//                                                          reads T, M, A once; writes W
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <functional>
#include <vector>

namespace {

constexpr int64_t kGrain = 32768;

const float* read(const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "fused_penalty: float32 contiguous CPU tensors only");
  TORCH_CHECK(t.numel() == like.numel(), "fused_penalty: tensors of different sizes");
  return t.data_ptr<float>();
}

void add_one(float* __restrict g, const float* __restrict t, const float* __restrict m,
             const float* __restrict a, float lam, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) g[i] += lam * a[i] * (t[i] - m[i]);
}

float weigh_one(float* __restrict w, const float* __restrict t, const float* __restrict m,
                const float* __restrict a, float lam, int64_t begin, int64_t end) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = begin; i < end; ++i) {
    const float d = t[i] - m[i];
    const float x = lam * a[i] * d;
    w[i] = x;
    sum += x * d;
  }
  return sum;
}

}  // namespace

void add_grad(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& params,
              const std::vector<at::Tensor>& centers, const std::vector<at::Tensor>& precisions,
              double lam) {
  for (size_t k = 0; k < grads.size(); ++k) {
    float* g = const_cast<float*>(read(grads[k], params[k]));
    const float* t = read(params[k], params[k]);
    const float* m = read(centers[k], params[k]);
    const float* a = read(precisions[k], params[k]);
    at::parallel_for(0, params[k].numel(), kGrain, [&](int64_t begin, int64_t end) {
      add_one(g, t, m, a, static_cast<float>(lam), begin, end);
    });
  }
}

double weighted(const std::vector<at::Tensor>& out, const std::vector<at::Tensor>& params,
                const std::vector<at::Tensor>& centers, const std::vector<at::Tensor>& precisions,
                double lam) {
  double total = 0.0;
  for (size_t k = 0; k < out.size(); ++k) {
    float* w = const_cast<float*>(read(out[k], params[k]));
    const float* t = read(params[k], params[k]);
    const float* m = read(centers[k], params[k]);
    const float* a = read(precisions[k], params[k]);
    total += at::parallel_reduce(
        0, params[k].numel(), kGrain, 0.0,
        [&](int64_t begin, int64_t end, double acc) {
          return acc + weigh_one(w, t, m, a, static_cast<float>(lam), begin, end);
        },
        std::plus<double>());
  }
  return 0.5 * total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_grad", &add_grad, "G += lam A (T - M), in place, one pass");
  m.def("weighted", &weighted, "W = lam A (T - M); returns 0.5 sum W (T - M), one pass");
}
