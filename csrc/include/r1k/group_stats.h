// Per-group advantage normalisation shared by the CPU (C++) and CUDA kernels.
//
// For one group of n rewards (NaN = unscorable, left out): pass 1 counts the valid rewards and
// finds their min and max; pass 2 sums (r - min); pass 3 sums ((r - min) - mean')^2 (two-pass
// variance on shifted data, so rewards of 1e6 +- 1e-2 keep their spread); pass 4 writes
//   adv = ((r - min) - mean') * factor / denom        (0 for NaN rewards and constant groups)
// with factor = n / (n - 1) for RLOO (leave-one-out baseline), else 1, and denom = std + eps
// (scale "group"), a batch-wide std + eps (scale "batch"), or 1 (scale "none").
#pragma once

#include <math.h>
#include <stdint.h>

#include "r1k/softmax_stats.h"  // R1K_HOST_DEVICE

namespace r1k {

enum GroupEstimator : int { kCentre = 0, kLeaveOneOut = 1 };
enum GroupScale : int { kScaleNone = 0, kScaleGroup = 1, kScaleBatch = 2 };

template <typename acc_t>
struct GroupResult {
  acc_t mean;
  acc_t std;
  bool constant;  // fewer than two valid rewards, or all equal: advantages are exactly 0
};

R1K_HOST_DEVICE float sqrt_(float x) { return sqrtf(x); }
R1K_HOST_DEVICE double sqrt_(double x) { return sqrt(x); }

// load(j) -> acc_t reward j of the group (NaN allowed); store(j, acc_t advantage).
template <typename acc_t, typename Load, typename Store>
R1K_HOST_DEVICE GroupResult<acc_t> normalize_group(int64_t n, const Load& load, const Store& store, int estimator,
                                                   int scale, acc_t eps, acc_t batch_denominator) {
  int64_t count = 0;
  acc_t lo = INFINITY, hi = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = load(j);
    if (x == x) {
      ++count;
      lo = x < lo ? x : lo;
      hi = x > hi ? x : hi;
    }
  }
  acc_t shifted_sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = load(j);
    if (x == x) shifted_sum += x - lo;
  }
  const acc_t shifted_mean = count > 0 ? shifted_sum / static_cast<acc_t>(count) : acc_t(0);
  acc_t m2 = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = load(j);
    if (x == x) {
      const acc_t d = (x - lo) - shifted_mean;
      m2 += d * d;
    }
  }
  GroupResult<acc_t> result;
  result.std = count > 1 ? sqrt_(m2 / static_cast<acc_t>(count - 1)) : acc_t(0);
  result.mean = count > 0 ? lo + shifted_mean : acc_t(NAN);
  result.constant = count <= 1 || hi == lo;
  const acc_t factor = (estimator == kLeaveOneOut && count > 1)
                           ? static_cast<acc_t>(count) / static_cast<acc_t>(count - 1) : acc_t(1);
  const acc_t denominator = scale == kScaleGroup ? result.std + eps
                            : scale == kScaleBatch ? batch_denominator : acc_t(1);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = load(j);
    const bool use = (x == x) && !result.constant;
    store(j, use ? ((x - lo) - shifted_mean) * factor / denominator : acc_t(0));
  }
  return result;
}

// Weighted sum of one completion's R rewards, NaNs skipped; NaN when all R are NaN.
template <typename acc_t, typename scalar_t>
R1K_HOST_DEVICE acc_t combine_rewards(const scalar_t* row, int64_t num_rewards, const acc_t* weights) {
  acc_t total = 0;
  bool any = false;
  for (int64_t k = 0; k < num_rewards; ++k) {
    const acc_t x = static_cast<acc_t>(row[k]);
    if (x - x == acc_t(0)) {  // finite: NaN and +-inf are failed rewards and take no part
      total += weights[k] * x;
      any = true;
    }
  }
  return any ? total : acc_t(NAN);
}

}  // namespace r1k
