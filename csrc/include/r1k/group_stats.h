// Per-group advantage normalisation shared by the CPU (C++) and CUDA kernels.
//
// For one group of n rewards (NaN = unscorable, left out): pass 1 counts the valid rewards and
// finds their min and max; pass 2 sums s = (r - min) * unit; pass 3 sums (s - mean_s)^2 (two-pass
// variance on shifted data, so rewards of 1e6 +- 1e-2 keep their spread); pass 4 writes
//   adv = (s - mean_s) * factor / denom        (0 for NaN rewards and constant groups)
// with factor = n / (n - 1) for RLOO (leave-one-out baseline), else 1, and denom, in the same unit,
// std + eps (scale "group"), a batch-wide std + eps (scale "batch"), or 1 (scale "none"). unit is 1,
// or kGroupRescale (exact, a power of two) for a group whose half range exceeds kGroupRescaleAbove,
// so that the squares cannot overflow (r1kernels/constants.py, restated here).
// r arrives in wide_t and s is formed there before it is narrowed to acc_t: several or weighted
// reward columns are combined in double (combine_rewards), so that a shared offset (1e4 + 1e-2 in
// fp32) leaves the group's spread intact; one unweighted column is already exact in acc_t.
#pragma once

#include <math.h>
#include <stdint.h>

#include "r1k/softmax_stats.h"  // R1K_HOST_DEVICE

namespace r1k {

enum GroupEstimator : int { kCentre = 0, kLeaveOneOut = 1 };
enum GroupScale : int { kScaleNone = 0, kScaleGroup = 1, kScaleBatch = 2 };
constexpr double kGroupRescaleAbove = 0x1p40;
constexpr double kGroupRescale = 0x1p-90;  // the batch denominator arrives times this too

template <typename acc_t>
struct GroupResult {
  acc_t mean;
  acc_t std;
  bool constant;  // fewer than two valid rewards, or all equal: advantages are exactly 0
};

R1K_HOST_DEVICE float sqrt_(float x) { return sqrtf(x); }
R1K_HOST_DEVICE double sqrt_(double x) { return sqrt(x); }

// load(j) -> wide_t reward j of the group (NaN allowed); store(j, acc_t advantage). batch_denominator
// is the batch's std + eps times kGroupRescale.
template <typename acc_t, typename wide_t, typename Load, typename Store>
R1K_HOST_DEVICE GroupResult<acc_t> normalize_group(int64_t n, const Load& load, const Store& store, int estimator,
                                                   int scale, acc_t eps, acc_t batch_denominator) {
  int64_t count = 0;
  wide_t lo = INFINITY, hi = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const wide_t x = load(j);
    if (x == x) {
      ++count;
      lo = x < lo ? x : lo;
      hi = x > hi ? x : hi;
    }
  }
  const wide_t half_range = hi * wide_t(0.5) - lo * wide_t(0.5);  // never overflows
  const acc_t unit = half_range > wide_t(kGroupRescaleAbove) ? acc_t(kGroupRescale) : acc_t(1);
  const wide_t lo_scaled = lo * unit;
  auto shifted = [&](wide_t x) { return static_cast<acc_t>(x * unit - lo_scaled); };  // s, narrowed
  acc_t shifted_sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const wide_t x = load(j);
    if (x == x) shifted_sum += shifted(x);
  }
  const acc_t shifted_mean = count > 0 ? shifted_sum / static_cast<acc_t>(count) : acc_t(0);
  acc_t m2 = 0;
  for (int64_t j = 0; j < n; ++j) {
    const wide_t x = load(j);
    if (x == x) {
      const acc_t d = shifted(x) - shifted_mean;
      m2 += d * d;
    }
  }
  GroupResult<acc_t> result;
  const acc_t std_scaled = count > 1 ? sqrt_(m2 / static_cast<acc_t>(count - 1)) : acc_t(0);
  result.std = std_scaled / unit;
  result.mean = count > 0 ? static_cast<acc_t>((lo_scaled + shifted_mean) / unit) : acc_t(NAN);
  result.constant = count <= 1 || hi == lo;
  const acc_t factor = (estimator == kLeaveOneOut && count > 1)
                           ? static_cast<acc_t>(count) / static_cast<acc_t>(count - 1) : acc_t(1);
  const acc_t denominator = scale == kScaleGroup ? std_scaled + eps * unit
                            : scale == kScaleBatch ? batch_denominator * (unit / acc_t(kGroupRescale)) : unit;
  for (int64_t j = 0; j < n; ++j) {
    const wide_t x = load(j);
    const bool use = (x == x) && !result.constant;
    store(j, use ? (shifted(x) - shifted_mean) * factor / denominator : acc_t(0));
  }
  return result;
}

// One unweighted reward column as it is: NaN and +-inf are failed rewards.
template <typename acc_t, typename scalar_t>
R1K_HOST_DEVICE acc_t single_reward(const scalar_t* row) {
  const acc_t x = static_cast<acc_t>(row[0]);
  return x - x == acc_t(0) ? x : acc_t(NAN);
}

// Weighted sum of one completion's R rewards in double, failed ones skipped (weights null: all
// ones); NaN when all R failed or the sum overflows acc_t. The product of an fp32 reward and an
// fp32 weight is exact in double, and the sum's rounding (2^-53 of its size) stays far below the
// spread within a group that acc_t can resolve.
template <typename acc_t, typename scalar_t>
R1K_HOST_DEVICE double combine_rewards(const scalar_t* row, int64_t num_rewards, const double* weights) {
  double total = 0;
  bool any = false;
  for (int64_t k = 0; k < num_rewards; ++k) {
    const double x = static_cast<double>(row[k]);
    if (x - x == 0.0) {  // finite: NaN and +-inf are failed rewards and take no part
      total += weights != nullptr ? weights[k] * x : x;
      any = true;
    }
  }
  const acc_t narrowed = static_cast<acc_t>(total);
  return any && narrowed - narrowed == acc_t(0) ? total : NAN;  // a sum that overflows acc_t fails too
}

}  // namespace r1k
