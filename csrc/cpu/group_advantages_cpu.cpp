// CPU group advantage normalisation: groups run in parallel, each through the shared
// normalize_group (csrc/include/r1k/group_stats.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "r1k/group_stats.h"

namespace r1k {
namespace {

// rewards [B, R] (unit stride along R); weights [R] (accumulation dtype); groups are either
// contiguous runs of group_size (offsets empty) or segments offsets[g]..offsets[g+1] of perm.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cpu(
    const at::Tensor& rewards, const at::Tensor& weights, int64_t group_size, const at::Tensor& offsets,
    const at::Tensor& perm, int64_t estimator, int64_t scale, double eps, const at::Tensor& batch_denominator) {
  TORCH_CHECK(rewards.dim() == 2 && rewards.stride(1) == 1, "rewards must be [B, R] with unit stride along R");
  const int64_t batch = rewards.size(0), num_rewards = rewards.size(1);
  const bool segmented = offsets.numel() > 0;
  TORCH_CHECK(segmented || (group_size > 0 && batch % group_size == 0), "batch must be a multiple of group_size");
  TORCH_CHECK(!segmented || (offsets.scalar_type() == at::kLong && perm.scalar_type() == at::kLong &&
                             offsets.is_contiguous() && perm.is_contiguous()),
              "offsets and perm must be contiguous int64");
  const int64_t groups = segmented ? offsets.numel() - 1 : batch / group_size;
  const auto acc_type = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weights.scalar_type() == acc_type && weights.is_contiguous() && weights.numel() == num_rewards,
              "weights must be a contiguous [R] tensor of the accumulation dtype");
  auto opts = rewards.options().dtype(acc_type);
  at::Tensor adv = at::empty({batch}, opts), mean = at::empty({groups}, opts), std = at::empty({groups}, opts);
  at::Tensor constant = at::empty({groups}, rewards.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "group_advantages_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const int64_t row_stride = rewards.stride(0);
    const acc_t* w = weights.data_ptr<acc_t>();
    const int64_t* off = segmented ? offsets.data_ptr<int64_t>() : nullptr;
    const int64_t* order = segmented ? perm.data_ptr<int64_t>() : nullptr;
    acc_t* out = adv.data_ptr<acc_t>();
    acc_t* means = mean.data_ptr<acc_t>();
    acc_t* stds = std.data_ptr<acc_t>();
    bool* constants = constant.data_ptr<bool>();
    const acc_t denominator = scale == kScaleBatch ? batch_denominator.item<acc_t>() : acc_t(1);
    at::parallel_for(0, groups, 64, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t start = segmented ? off[g] : g * group_size;
        const int64_t n = segmented ? off[g + 1] - start : group_size;
        auto row_of = [&](int64_t j) { return segmented ? order[start + j] : start + j; };
        auto load = [&](int64_t j) { return combine_rewards<acc_t>(r + row_of(j) * row_stride, num_rewards, w); };
        auto store = [&](int64_t j, acc_t value) { out[row_of(j)] = value; };
        const GroupResult<acc_t> res =
            normalize_group<acc_t>(n, load, store, static_cast<int>(estimator), static_cast<int>(scale),
                                   static_cast<acc_t>(eps), denominator);
        means[g] = res.mean;
        stds[g] = res.std;
        constants[g] = res.constant;
      }
    });
  });
  return {adv, mean, std, constant};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1k_C, CPU, m) { m.impl("group_advantages", &group_advantages_cpu); }

}  // namespace r1k
