// CPU group advantage normalisation: groups run in parallel, each through the shared
// normalize_group (csrc/include/r1k/group_stats.h). Groups are contiguous runs of group_size,
// segments of a permutation, or (group_advantages_by_id) found here from arbitrary integer ids.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "r1k/group_stats.h"

namespace r1k {
namespace {

// Groups as segments order[offsets[g] .. offsets[g+1]) of row numbers (int32: half the memory
// traffic of int64, and B < 2^31 is checked).
struct Segments {
  std::vector<int32_t> offsets, order, group_of_row;
};

// Linear-probing hash map from id to group number (Fibonacci hashing); doubles when half full.
class GroupTable {
 public:
  // The group of `id`, numbered in order of first appearance.
  int64_t group_of(int64_t id) {
    uint64_t slot = slot_of(id);
    if (slots_[slot].group < 0) {
      if (2 * (groups_ + 1) > slots_.size()) {
        grow();
        slot = slot_of(id);
      }
      slots_[slot] = Slot{id, groups_++};
    }
    return slots_[slot].group;
  }
  int64_t groups() const { return groups_; }

 private:
  struct Slot {
    int64_t id;
    int64_t group;  // -1: empty
  };
  uint64_t slot_of(int64_t id) const {  // the id's slot, or the empty slot where it belongs
    const uint64_t mask = slots_.size() - 1;
    uint64_t slot = (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> shift_;
    while (slots_[slot].group >= 0 && slots_[slot].id != id) slot = (slot + 1) & mask;
    return slot;
  }
  void grow() {
    std::vector<Slot> old(2 * slots_.size(), Slot{0, -1});
    old.swap(slots_);
    --shift_;
    for (const Slot& s : old)
      if (s.group >= 0) slots_[slot_of(s.id)] = s;
  }
  std::vector<Slot> slots_ = std::vector<Slot>(1024, Slot{0, -1});
  int shift_ = 64 - 10;
  int64_t groups_ = 0;
};

// Groups of equal ids, numbered in order of first appearance, each listing its rows in batch
// order (a counting sort). A row with the same id as the row before skips the lookup: uids
// usually come in runs.
template <typename id_t>
Segments segments_by_id(const id_t* ids, int64_t batch) {
  GroupTable table;
  Segments s;
  s.group_of_row.resize(batch);
  std::vector<int32_t> counts;
  for (int64_t row = 0; row < batch; ++row) {
    const bool same_as_previous = row > 0 && ids[row] == ids[row - 1];
    const int64_t group = same_as_previous ? s.group_of_row[row - 1] : table.group_of(static_cast<int64_t>(ids[row]));
    if (group == static_cast<int64_t>(counts.size())) counts.push_back(0);
    s.group_of_row[row] = static_cast<int32_t>(group);
    ++counts[group];
  }
  s.offsets.assign(counts.size() + 1, 0);
  for (size_t g = 0; g < counts.size(); ++g) s.offsets[g + 1] = s.offsets[g] + counts[g];
  std::vector<int32_t> cursor(s.offsets.begin(), s.offsets.end() - 1);
  s.order.resize(batch);
  for (int64_t row = 0; row < batch; ++row) s.order[cursor[s.group_of_row[row]]++] = static_cast<int32_t>(row);
  return s;
}

// Runs normalize_group over every group: group g is rows row_of(g, j) for j < size_of(g). One
// unweighted column is read as it is; several or weighted columns are combined in double.
template <typename SizeOf, typename RowOf>
void normalize_groups(const at::Tensor& rewards, const std::optional<at::Tensor>& weights, int64_t groups,
                      const SizeOf& size_of, const RowOf& row_of, int64_t estimator, int64_t scale, double eps,
                      const at::Tensor& batch_denominator, at::Tensor& adv, at::Tensor& mean, at::Tensor& std,
                      at::Tensor& constant) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "group_advantages_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const int64_t row_stride = rewards.stride(0), num_rewards = rewards.size(1);
    const double* w = weights.has_value() ? weights->data_ptr<double>() : nullptr;
    acc_t* out = adv.data_ptr<acc_t>();
    acc_t* means = mean.data_ptr<acc_t>();
    acc_t* stds = std.data_ptr<acc_t>();
    bool* constants = constant.data_ptr<bool>();
    const acc_t denominator = scale == kScaleBatch ? batch_denominator.item<acc_t>() : acc_t(1);
    auto run = [&](auto load_row) {
      using wide_t = decltype(load_row(r));
      at::parallel_for(0, groups, 64, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) {
          auto load = [&](int64_t j) { return load_row(r + row_of(g, j) * row_stride); };
          auto store = [&](int64_t j, acc_t value) { out[row_of(g, j)] = value; };
          const GroupResult<acc_t> res = normalize_group<acc_t, wide_t>(
              size_of(g), load, store, static_cast<int>(estimator), static_cast<int>(scale),
              static_cast<acc_t>(eps), denominator);
          means[g] = res.mean;
          stds[g] = res.std;
          constants[g] = res.constant;
        }
      });
    };
    if (num_rewards == 1 && w == nullptr) {
      run([](const scalar_t* row) { return single_reward<acc_t>(row); });
    } else {
      run([&](const scalar_t* row) { return combine_rewards<acc_t>(row, num_rewards, w); });
    }
  });
}

at::ScalarType check_inputs(const at::Tensor& rewards, const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(rewards.dim() == 2 && rewards.stride(1) == 1, "rewards must be [B, R] with unit stride along R");
  TORCH_CHECK(!weights.has_value() || (weights->scalar_type() == at::kDouble && weights->is_contiguous() &&
                                       weights->numel() == rewards.size(1)),
              "weights must be a contiguous float64 [R] tensor, or None");
  return rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// rewards [B, R] (unit stride along R); weights [R] (float64) or None; groups are either
// contiguous runs of group_size (offsets empty) or segments offsets[g]..offsets[g+1] of perm.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cpu(
    const at::Tensor& rewards, const std::optional<at::Tensor>& weights, int64_t group_size, const at::Tensor& offsets,
    const at::Tensor& perm, int64_t estimator, int64_t scale, double eps, const at::Tensor& batch_denominator) {
  const auto acc_type = check_inputs(rewards, weights);
  const int64_t batch = rewards.size(0);
  const bool segmented = offsets.numel() > 0;
  TORCH_CHECK(segmented || (group_size > 0 && batch % group_size == 0), "batch must be a multiple of group_size");
  TORCH_CHECK(!segmented || (offsets.scalar_type() == at::kLong && perm.scalar_type() == at::kLong &&
                             offsets.is_contiguous() && perm.is_contiguous()),
              "offsets and perm must be contiguous int64");
  const int64_t groups = segmented ? offsets.numel() - 1 : batch / group_size;
  auto opts = rewards.options().dtype(acc_type);
  at::Tensor adv = at::empty({batch}, opts), mean = at::empty({groups}, opts), std = at::empty({groups}, opts);
  at::Tensor constant = at::empty({groups}, rewards.options().dtype(at::kBool));
  if (segmented) {
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t* order = perm.data_ptr<int64_t>();
    normalize_groups(
        rewards, weights, groups, [&](int64_t g) { return off[g + 1] - off[g]; },
        [&](int64_t g, int64_t j) { return order[off[g] + j]; }, estimator, scale, eps, batch_denominator, adv, mean,
        std, constant);
  } else {
    normalize_groups(
        rewards, weights, groups, [&](int64_t) { return group_size; },
        [&](int64_t g, int64_t j) { return g * group_size + j; }, estimator, scale, eps, batch_denominator, adv, mean,
        std, constant);
  }
  return {adv, mean, std, constant};
}

// The same for arbitrary integer ids (int32 or int64) in one call: advantages [B] and, with
// with_stats, each row's group mean, std and constant flag, and whether it is its group's first row.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_by_id_cpu(
    const at::Tensor& rewards, const std::optional<at::Tensor>& weights, const at::Tensor& group_ids, int64_t estimator,
    int64_t scale, double eps, const at::Tensor& batch_denominator, bool with_stats) {
  const auto acc_type = check_inputs(rewards, weights);
  const int64_t batch = rewards.size(0);
  TORCH_CHECK(group_ids.dim() == 1 && group_ids.numel() == batch && group_ids.is_contiguous() &&
                  (group_ids.scalar_type() == at::kLong || group_ids.scalar_type() == at::kInt),
              "group_ids must be a contiguous int32 or int64 [B] tensor");
  TORCH_CHECK(batch < INT32_MAX, "group_ids: at most 2^31 - 1 rows, got ", batch);
  const Segments s = group_ids.scalar_type() == at::kLong ? segments_by_id(group_ids.data_ptr<int64_t>(), batch)
                                                          : segments_by_id(group_ids.data_ptr<int32_t>(), batch);
  const int64_t groups = static_cast<int64_t>(s.offsets.size()) - 1;
  auto opts = rewards.options().dtype(acc_type);
  at::Tensor adv = at::empty({batch}, opts), mean = at::empty({groups}, opts), std = at::empty({groups}, opts);
  at::Tensor constant = at::empty({groups}, rewards.options().dtype(at::kBool));
  normalize_groups(
      rewards, weights, groups, [&](int64_t g) { return s.offsets[g + 1] - s.offsets[g]; },
      [&](int64_t g, int64_t j) { return s.order[s.offsets[g] + j]; }, estimator, scale, eps, batch_denominator, adv,
      mean, std, constant);
  if (!with_stats) {
    return {adv, at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, constant.options()),
            at::empty({0}, constant.options())};
  }
  const at::Tensor group_of_row = at::from_blob(const_cast<int32_t*>(s.group_of_row.data()), {batch}, at::kInt);
  at::Tensor is_first = at::zeros({batch}, constant.options());
  bool* first = is_first.data_ptr<bool>();
  for (int64_t g = 0; g < groups; ++g) first[s.order[s.offsets[g]]] = true;
  return {adv, mean.index_select(0, group_of_row), std.index_select(0, group_of_row),
          constant.index_select(0, group_of_row), is_first};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1k_C, CPU, m) {
  m.impl("group_advantages", &group_advantages_cpu);
  m.impl("group_advantages_by_id", &group_advantages_by_id_cpu);
}

}  // namespace r1k
