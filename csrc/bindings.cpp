// Registers every r1kernels C++ op with torch.library (namespace r1k_C) and their CUDA
// implementations; CPU implementations register themselves in csrc/cpu/.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef R1K_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // only the stream: ATen/cuda/CUDAContext.h would pull in cuBLAS and cuSPARSE headers

#include "r1k/cuda_launchers.h"
#endif

namespace r1k {

bool built_with_cuda() {
#ifdef R1K_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef R1K_WITH_CUDA
namespace {

cuda::RowsView rows_view(const at::Tensor& logits, const at::Tensor& targets, double inv_temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [rows, vocab] with unit vocab stride");
  TORCH_CHECK(targets.is_contiguous() && targets.numel() == logits.size(0), "targets must be contiguous [rows]");
  cuda::Dtype dtype;
  switch (logits.scalar_type()) {
    case at::kFloat: dtype = cuda::Dtype::kFloat32; break;
    case at::kHalf: dtype = cuda::Dtype::kFloat16; break;
    case at::kBFloat16: dtype = cuda::Dtype::kBFloat16; break;
    default: TORCH_CHECK(false, "the cuda backend runs float32, float16 and bfloat16 logits, got ", logits.scalar_type());
  }
  return {logits.data_ptr(), logits.stride(0), dtype, targets.data_ptr(), targets.scalar_type() == at::kInt,
          logits.size(0), logits.size(1), static_cast<float>(inv_temperature)};
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward_cuda(
    const at::Tensor& logits, const at::Tensor& targets, double inv_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto view = rows_view(logits, targets, inv_temperature);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({view.rows}, opts), entropy = at::empty({view.rows}, opts);
  at::Tensor row_max = at::empty({view.rows}, opts), row_log_sum = at::empty({view.rows}, opts);
  check_launch(cuda::token_logprobs_forward(view, logp.data_ptr<float>(), entropy.data_ptr<float>(),
                                            row_max.data_ptr<float>(), row_log_sum.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream().stream()),
               "token_logprobs_forward");
  return {logp, entropy, row_max, row_log_sum};
}

void token_logprobs_backward_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& row_max,
                                  const at::Tensor& row_log_sum, const at::Tensor& entropy,
                                  const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                  double inv_temperature, at::Tensor out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(out.sizes() == logits.sizes() && out.stride(1) == 1 && out.scalar_type() == logits.scalar_type(),
              "out must match logits in shape and dtype, with unit vocab stride");
  TORCH_CHECK(grad_logp.is_contiguous() && grad_logp.scalar_type() == at::kFloat, "grad_logp must be contiguous fp32");
  const auto view = rows_view(logits, targets, inv_temperature);
  check_launch(cuda::token_logprobs_backward(view, row_max.data_ptr<float>(), row_log_sum.data_ptr<float>(),
                                             entropy.data_ptr<float>(), grad_logp.data_ptr<float>(),
                                             grad_entropy.has_value() ? grad_entropy->data_ptr<float>() : nullptr,
                                             out.data_ptr(), out.stride(0), c10::cuda::getCurrentCUDAStream().stream()),
               "token_logprobs_backward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cuda(
    const at::Tensor& rewards, const std::optional<at::Tensor>& weights, int64_t group_size, const at::Tensor& offsets,
    const at::Tensor& perm, int64_t estimator, int64_t scale, double eps, const at::Tensor& batch_denominator) {
  const c10::cuda::CUDAGuard guard(rewards.device());
  TORCH_CHECK(!weights.has_value() || (weights->scalar_type() == at::kDouble && weights->is_contiguous() &&
                                       weights->numel() == rewards.size(1)),
              "weights must be a contiguous float64 [R] tensor, or None");
  TORCH_CHECK(rewards.dim() == 2 && rewards.stride(1) == 1 && rewards.scalar_type() == at::kFloat,
              "the cuda backend takes fp32 rewards [B, R] with unit stride along R");
  const bool segmented = offsets.numel() > 0;
  const int64_t batch = rewards.size(0);
  const int64_t groups = segmented ? offsets.numel() - 1 : batch / group_size;
  auto opts = rewards.options();
  at::Tensor adv = at::empty({batch}, opts), mean = at::empty({groups}, opts), std = at::empty({groups}, opts);
  at::Tensor constant = at::empty({groups}, opts.dtype(at::kBool));
  at::Tensor denominator = batch_denominator.to(opts).contiguous();
  const cuda::GroupsView view{rewards.data_ptr<float>(), rewards.stride(0), rewards.size(1),
                              weights.has_value() ? weights->data_ptr<double>() : nullptr, groups, group_size,
                              segmented ? offsets.data_ptr<int64_t>() : nullptr,
                              segmented ? perm.data_ptr<int64_t>() : nullptr, static_cast<int>(estimator),
                              static_cast<int>(scale), static_cast<float>(eps), denominator.data_ptr<float>()};
  check_launch(cuda::group_advantages(view, adv.data_ptr<float>(), mean.data_ptr<float>(), std.data_ptr<float>(),
                                      constant.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream().stream()),
               "group_advantages");
  return {adv, mean, std, constant};
}

}  // namespace
#endif

TORCH_LIBRARY(r1k_C, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("token_logprobs_forward(Tensor logits, Tensor targets, float inv_temperature)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("token_logprobs_backward(Tensor logits, Tensor targets, Tensor row_max, Tensor row_log_sum,"
        " Tensor entropy, Tensor grad_logp, Tensor? grad_entropy, float inv_temperature, Tensor(a!) out) -> ()");
  m.def("group_advantages(Tensor rewards, Tensor? weights, int group_size, Tensor offsets, Tensor perm,"
        " int estimator, int scale, float eps, Tensor batch_denominator) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("group_advantages_by_id(Tensor rewards, Tensor? weights, Tensor group_ids, int estimator, int scale,"
        " float eps, Tensor batch_denominator, bool with_stats) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#ifdef R1K_WITH_CUDA
TORCH_LIBRARY_IMPL(r1k_C, CUDA, m) {
  m.impl("token_logprobs_forward", &token_logprobs_forward_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
  m.impl("group_advantages", &group_advantages_cuda);
}
#endif

}  // namespace r1k

// The Python module only exists so that `import r1kernels._C` loads the registrations above.
PYBIND11_MODULE(_C, module) {}
