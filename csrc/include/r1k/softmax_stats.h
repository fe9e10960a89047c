// Softmax statistics shared by the CPU (C++) and CUDA kernels: one copy of the math.
//
// For z = logits * inv_temperature over a row we keep, relative to the running max m:
//   sum    s = sum_v exp(z_v - m)
//   tilted t = sum_v exp(z_v - m) * (z_v - m)
// so that, at the end, log p_v = (z_v - m) - log s and the entropy H = log s - t / s.
// Keeping m apart from log s (rather than one log-sum-exp) keeps z_v - m exact, which is
// what makes log-probs and gradients accurate for logits around 1e4.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define R1K_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define R1K_HOST_DEVICE inline
#endif

namespace r1k {

constexpr long long kIgnoreIndex = -100;

R1K_HOST_DEVICE float exp_(float x) { return expf(x); }
R1K_HOST_DEVICE double exp_(double x) { return exp(x); }
R1K_HOST_DEVICE float log_(float x) { return logf(x); }
R1K_HOST_DEVICE double log_(double x) { return log(x); }

template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t sum;
  acc_t tilted;

  R1K_HOST_DEVICE static SoftmaxStats empty() { return {-INFINITY, acc_t(0), acc_t(0)}; }

  // Add one element. -inf logits contribute nothing.
  R1K_HOST_DEVICE void add(acc_t z) {
    if (z == -INFINITY) return;
    if (sum == acc_t(0)) {
      max = z;
      sum = acc_t(1);
      tilted = acc_t(0);
    } else if (z > max) {
      const acc_t shift = max - z;  // < 0
      const acc_t scale = exp_(shift);
      tilted = scale * (tilted + shift * sum);
      sum = scale * sum + acc_t(1);
      max = z;
    } else {
      const acc_t d = z - max;
      const acc_t e = exp_(d);
      sum += e;
      tilted += e > acc_t(0) ? e * d : acc_t(0);
    }
  }

  // Merge statistics of a disjoint set of elements (exact, order-independent up to rounding).
  R1K_HOST_DEVICE void merge(const SoftmaxStats& other) {
    if (other.sum == acc_t(0)) return;
    if (sum == acc_t(0)) {
      *this = other;
      return;
    }
    const acc_t m = max > other.max ? max : other.max;
    const acc_t shift_a = max - m, shift_b = other.max - m;
    const acc_t a = exp_(shift_a), b = exp_(shift_b);
    tilted = a * (tilted + shift_a * sum) + b * (other.tilted + shift_b * other.sum);
    sum = a * sum + b * other.sum;
    max = m;
  }

  R1K_HOST_DEVICE acc_t log_sum() const { return log_(sum); }
  R1K_HOST_DEVICE acc_t entropy() const { return log_(sum) - tilted / sum; }
};

// d(g_logp * logp + g_ent * H) / dz_v for one element of a row, where
//   d logp / dz_v = 1[v = t] - p_v      and      d H / dz_v = -p_v (log p_v + H).
template <typename acc_t>
R1K_HOST_DEVICE acc_t logit_grad(acc_t z_minus_max, acc_t row_log_sum, acc_t entropy, bool is_target,
                                 acc_t grad_logp, acc_t grad_entropy) {
  const acc_t log_p = z_minus_max - row_log_sum;
  const acc_t p = exp_(log_p);
  acc_t dz = (is_target ? grad_logp : acc_t(0)) - grad_logp * p;
  if (p > acc_t(0)) dz -= grad_entropy * p * (log_p + entropy);
  return dz;
}

}  // namespace r1k
