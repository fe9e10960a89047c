// CUDA group advantage normalisation: one thread per group through the shared normalize_group
// (csrc/include/r1k/group_stats.h). GRPO groups are small (8 to 64 completions), so a thread
// walks its group's rewards from L1/L2; a warp covers 32 consecutive groups, whose contiguous
// rows make each pass a coalesced sweep. Plain CUDA, no torch headers (compile-checked in CI).
#include <cuda_runtime.h>

#include <cstdint>

#include "r1k/cuda_launchers.h"
#include "r1k/group_stats.h"

namespace r1k {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// Group g of the batch through normalize_group, each row's reward read by load_row (wide_t).
template <typename wide_t, typename LoadRow>
__device__ void normalize_one_group(const GroupsView& in, int64_t g, const LoadRow& load_row, float* adv, float* mean,
                                    float* std, bool* constant) {
  const int64_t start = in.offsets != nullptr ? in.offsets[g] : g * in.group_size;
  const int64_t n = in.offsets != nullptr ? in.offsets[g + 1] - start : in.group_size;
  auto row_of = [&](int64_t j) { return in.perm != nullptr ? in.perm[start + j] : start + j; };
  auto load = [&](int64_t j) { return load_row(in.rewards + row_of(j) * in.row_stride); };
  auto store = [&](int64_t j, float value) { adv[row_of(j)] = value; };
  const float denominator = in.scale == kScaleBatch ? *in.batch_denominator : 1.f;
  const GroupResult<float> res =
      normalize_group<float, wide_t>(n, load, store, in.estimator, in.scale, in.eps, denominator);
  mean[g] = res.mean;
  std[g] = res.std;
  constant[g] = res.constant;
}

// One unweighted column is read as it is; several or weighted columns are combined in double.
__global__ void __launch_bounds__(kThreads) group_advantages_kernel(GroupsView in, float* adv, float* mean,
                                                                    float* std, bool* constant) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= in.groups) return;
  if (in.num_rewards == 1 && in.weights == nullptr) {
    normalize_one_group<float>(in, g, [](const float* row) { return single_reward<float>(row); }, adv, mean, std,
                               constant);
  } else {
    normalize_one_group<double>(
        in, g, [&](const float* row) { return combine_rewards<float>(row, in.num_rewards, in.weights); }, adv, mean,
        std, constant);
  }
}

}  // namespace

int group_advantages(const GroupsView& in, float* adv, float* mean, float* std, bool* constant, void* stream) {
  if (in.groups == 0) return 0;
  const int64_t blocks = (in.groups + kThreads - 1) / kThreads;
  if (blocks > 2147483647) return static_cast<int>(cudaErrorInvalidConfiguration);
  group_advantages_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      in, adv, mean, std, constant);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace r1k
