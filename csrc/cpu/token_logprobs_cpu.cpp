// CPU row kernels for token log-probs and entropy (see r1kernels/kernels/__init__.py for the contract).
// One row per task under at::parallel_for; a row is read in cache-sized blocks whose
// statistics merge through the shared SoftmaxStats, so each element is loaded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "r1k/softmax_stats.h"

namespace r1k {
namespace {

constexpr int64_t kBlock = 512;  // elements per block: the block's z values stay in L1

// ---- fp32 rows, vectorised: exp is the largest cost after the GEMMs, and libm's expf is scalar.
// exp(x) by Cody-Waite reduction x = n ln2 + r (|r| <= ln2 / 2) and a degree-6 Taylor polynomial
// (relative error below 2e-7), 2^n built in the exponent bits; n is rounded with the 1.5 * 2^23
// trick, so the loops have no calls and, with every FP op computed before a select (GCC will not
// if-convert an FP op that may trap), no branches: GCC vectorises them. Arguments below -87
// (where expf is denormal or 0, including -inf) give exactly 0. Each loop is compiled three times,
// for AVX-512 and for AVX2 (both with FMA: kFma, the polynomial's multiply-adds fused, written out
// since setup.py turns off contraction) and for the baseline; the CPU's features pick one at load.
// The two FMA builds compute the same roundings; only their sums' order differs.
template <bool kFma>
__attribute__((always_inline)) inline float multiply_add(float a, float b, float c) {
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

template <bool kFma>
__attribute__((always_inline)) inline float exp_vectorisable(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = multiply_add<kFma>(xc, 1.44269504f, 12582912.0f);
  const float n = t - 12582912.0f;
  int32_t n_int;
  std::memcpy(&n_int, &t, sizeof n_int);
  n_int -= 0x4B400000;
  const float r = multiply_add<kFma>(-n, 1.42860677e-6f, multiply_add<kFma>(-n, 0.693145752f, xc));
  float poly = multiply_add<kFma>(1.0f / 720, r, 1.0f / 120);
  poly = multiply_add<kFma>(poly, r, 1.0f / 24);
  poly = multiply_add<kFma>(poly, r, 1.0f / 6);
  poly = multiply_add<kFma>(poly, r, 0.5f);
  poly = multiply_add<kFma>(poly, r, 1.0f);
  poly = multiply_add<kFma>(poly, r, 1.0f);
  const int32_t scale_bits = (n_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const float value = poly * scale;  // computed before the select, so no FP op is conditional
  return x < -87.0f ? 0.0f : value;
}

// z_j = row_j * inv_t over a block of n values; returns their max, NaN if any z is NaN (the
// reference's NaN rule: a block of only NaN must not be skipped as empty). The NaN test is an
// integer reduction beside the max, so the loop vectorises.
__attribute__((always_inline)) inline float scale_max_body(const float* row, float* z, int64_t n, float inv_t) {
  float block_max = -INFINITY;
  int any_nan = 0;
#pragma omp simd reduction(max : block_max) reduction(| : any_nan)
  for (int64_t j = 0; j < n; ++j) {
    const float value = row[j] * inv_t;
    z[j] = value;
    block_max = value > block_max ? value : block_max;
    any_nan |= value != value;
  }
  return any_nan ? NAN : block_max;
}

// sum += exp(z_j - m), tilted += exp(z_j - m) (z_j - m) over a block of n values (all <= m).
template <bool kFma>
__attribute__((always_inline)) inline void exp_sum_tilted_body(const float* z, int64_t n, float m, float* sum,
                                                               float* tilted) {
  float s = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, t)
  for (int64_t j = 0; j < n; ++j) {
    const float d = z[j] - m;
    const float e = exp_vectorisable<kFma>(d);
    const float tilt = e * d;
    s += e;
    t += e > 0.0f ? tilt : 0.0f;
  }
  *sum = s;
  *tilted = t;
}

// d logits of one fp32 row (logit_grad of softmax_stats.h, vectorised); the target's +g_logp after.
// z = row * inv_t is rounded before the max is subtracted, as row_stats rounded it (no fused
// multiply-add here): the max element's z - m is then exactly 0.
template <bool kFma>
__attribute__((always_inline)) inline void logit_grad_row_body(const float* row, float* drow, int64_t vocab,
                                                               float inv_t, float m, float log_sum, float entropy,
                                                               float g_logp, float g_ent) {
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) {
    const float log_p = (row[v] * inv_t - m) - log_sum;
    const float p = exp_vectorisable<kFma>(log_p);
    const float term = g_ent * p * (log_p + entropy);
    const float entropy_term = p > 0.0f ? term : 0.0f;
    drow[v] = multiply_add<kFma>(-g_logp, p, -entropy_term) * inv_t;
  }
}

// The three builds of each loop, and the pick.
#define R1K_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))
#define R1K_AVX2 __attribute__((target("avx2,fma")))

R1K_AVX512 float scale_max_avx512(const float* row, float* z, int64_t n, float inv_t) {
  return scale_max_body(row, z, n, inv_t);
}
R1K_AVX2 float scale_max_avx2(const float* row, float* z, int64_t n, float inv_t) {
  return scale_max_body(row, z, n, inv_t);
}
float scale_max_baseline(const float* row, float* z, int64_t n, float inv_t) {
  return scale_max_body(row, z, n, inv_t);
}

R1K_AVX512 void exp_sum_tilted_avx512(const float* z, int64_t n, float m, float* sum, float* tilted) {
  exp_sum_tilted_body<true>(z, n, m, sum, tilted);
}
R1K_AVX2 void exp_sum_tilted_avx2(const float* z, int64_t n, float m, float* sum, float* tilted) {
  exp_sum_tilted_body<true>(z, n, m, sum, tilted);
}
void exp_sum_tilted_baseline(const float* z, int64_t n, float m, float* sum, float* tilted) {
  exp_sum_tilted_body<false>(z, n, m, sum, tilted);
}

R1K_AVX512 void logit_grad_row_avx512(const float* row, float* drow, int64_t vocab, float inv_t, float m,
                                      float log_sum, float entropy, float g_logp, float g_ent) {
  logit_grad_row_body<true>(row, drow, vocab, inv_t, m, log_sum, entropy, g_logp, g_ent);
}
R1K_AVX2 void logit_grad_row_avx2(const float* row, float* drow, int64_t vocab, float inv_t, float m, float log_sum,
                                  float entropy, float g_logp, float g_ent) {
  logit_grad_row_body<true>(row, drow, vocab, inv_t, m, log_sum, entropy, g_logp, g_ent);
}
void logit_grad_row_baseline(const float* row, float* drow, int64_t vocab, float inv_t, float m, float log_sum,
                             float entropy, float g_logp, float g_ent) {
  logit_grad_row_body<false>(row, drow, vocab, inv_t, m, log_sum, entropy, g_logp, g_ent);
}

enum class Isa { kAvx512, kAvx2, kBaseline };

Isa detect_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kBaseline;
}

const Isa kIsa = detect_isa();

float scale_max_f32(const float* row, float* z, int64_t n, float inv_t) {
  switch (kIsa) {
    case Isa::kAvx512: return scale_max_avx512(row, z, n, inv_t);
    case Isa::kAvx2: return scale_max_avx2(row, z, n, inv_t);
    default: return scale_max_baseline(row, z, n, inv_t);
  }
}

void exp_sum_tilted_f32(const float* z, int64_t n, float m, float* sum, float* tilted) {
  switch (kIsa) {
    case Isa::kAvx512: return exp_sum_tilted_avx512(z, n, m, sum, tilted);
    case Isa::kAvx2: return exp_sum_tilted_avx2(z, n, m, sum, tilted);
    default: return exp_sum_tilted_baseline(z, n, m, sum, tilted);
  }
}

void logit_grad_row_f32(const float* row, float* drow, int64_t vocab, float inv_t, float m, float log_sum,
                        float entropy, float g_logp, float g_ent) {
  switch (kIsa) {
    case Isa::kAvx512: return logit_grad_row_avx512(row, drow, vocab, inv_t, m, log_sum, entropy, g_logp, g_ent);
    case Isa::kAvx2: return logit_grad_row_avx2(row, drow, vocab, inv_t, m, log_sum, entropy, g_logp, g_ent);
    default: return logit_grad_row_baseline(row, drow, vocab, inv_t, m, log_sum, entropy, g_logp, g_ent);
  }
}

template <typename scalar_t, typename acc_t>
SoftmaxStats<acc_t> row_stats(const scalar_t* row, int64_t vocab, acc_t inv_t) {
  SoftmaxStats<acc_t> stats = SoftmaxStats<acc_t>::empty();
  acc_t z[kBlock];
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    acc_t block_max = -INFINITY;
    if constexpr (std::is_same_v<scalar_t, float>) {
      block_max = scale_max_f32(row + start, z, n, inv_t);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        z[j] = static_cast<acc_t>(row[start + j]) * inv_t;
        // NaN wins: std::max would drop it, and a block of only NaN would then be skipped as empty,
        // giving a finite logp (and a NaN gradient) where the reference gives NaN
        block_max = (z[j] > block_max || z[j] != z[j]) ? z[j] : block_max;
      }
    }
    if (block_max == -INFINITY) continue;
    SoftmaxStats<acc_t> block{block_max, acc_t(0), acc_t(0)};
    if constexpr (std::is_same_v<acc_t, float>) {
      exp_sum_tilted_f32(z, n, block_max, &block.sum, &block.tilted);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const acc_t d = z[j] - block_max;
        const acc_t e = exp_(d);
        block.sum += e;
        block.tilted += e > acc_t(0) ? e * d : acc_t(0);
      }
    }
    stats.merge(block);
  }
  return stats;
}

template <typename index_t>
int64_t target_at(const at::Tensor& targets, int64_t i) {
  return static_cast<int64_t>(targets.data_ptr<index_t>()[i]);
}

int64_t load_target(const at::Tensor& targets, int64_t i) {
  return targets.scalar_type() == at::kInt ? target_at<int32_t>(targets, i) : target_at<int64_t>(targets, i);
}

void check_rows(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [rows, vocab] with unit vocab stride");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.is_contiguous(),
              "targets must be a contiguous [rows] tensor");
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, "targets must be int64/int32");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward_cpu(
    const at::Tensor& logits, const at::Tensor& targets, double inv_temperature) {
  check_rows(logits, targets);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(acc_type);
  at::Tensor logp = at::empty({rows}, opts), entropy = at::empty({rows}, opts);
  at::Tensor row_max = at::empty({rows}, opts), row_log_sum = at::empty({rows}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    acc_t* out_logp = logp.data_ptr<acc_t>();
    acc_t* out_ent = entropy.data_ptr<acc_t>();
    acc_t* out_max = row_max.data_ptr<acc_t>();
    acc_t* out_log_sum = row_log_sum.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = base + i * stride;
        const SoftmaxStats<acc_t> stats = row_stats<scalar_t, acc_t>(row, vocab, inv_t);
        const acc_t log_sum = stats.log_sum();
        const int64_t t = load_target(targets, i);
        const bool valid = t != kIgnoreIndex;
        out_max[i] = stats.max;
        out_log_sum[i] = log_sum;
        out_logp[i] = valid ? (static_cast<acc_t>(row[t]) * inv_t - stats.max) - log_sum : acc_t(0);
        out_ent[i] = valid ? stats.entropy() : acc_t(0);
      }
    });
  });
  return {logp, entropy, row_max, row_log_sum};
}

void token_logprobs_backward_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& row_max,
                                 const at::Tensor& row_log_sum, const at::Tensor& entropy,
                                 const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                 double inv_temperature, at::Tensor out) {
  check_rows(logits, targets);
  TORCH_CHECK(out.sizes() == logits.sizes() && out.stride(1) == 1 && out.scalar_type() == logits.scalar_type(),
              "out must match logits in shape and dtype, with unit vocab stride");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto stats_t = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    TORCH_CHECK(row_max.scalar_type() == stats_t && grad_logp.scalar_type() == stats_t && grad_logp.is_contiguous(),
                "row statistics and grad_logp must be contiguous accumulation-dtype vectors");
    const scalar_t* in = logits.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();  // may alias `in`: each element is read before it is written
    const int64_t stride = logits.stride(0), out_stride = out.stride(0);
    const acc_t* maxes = row_max.data_ptr<acc_t>();
    const acc_t* log_sums = row_log_sum.data_ptr<acc_t>();
    const acc_t* ents = entropy.data_ptr<acc_t>();
    const acc_t* g_logp = grad_logp.data_ptr<acc_t>();
    const acc_t* g_ent = grad_entropy.has_value() ? grad_entropy->data_ptr<acc_t>() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = in + i * stride;
        scalar_t* drow = dst + i * out_stride;
        const int64_t t = load_target(targets, i);
        if (t == kIgnoreIndex) {
          std::fill(drow, drow + vocab, scalar_t(0));
          continue;
        }
        const acc_t m = maxes[i], ls = log_sums[i], h = ents[i];
        const acc_t gl = g_logp[i], ge = g_ent ? g_ent[i] : acc_t(0);
        if constexpr (std::is_same_v<scalar_t, float>) {  // (the casts are no-ops; other types skip this)
          logit_grad_row_f32(reinterpret_cast<const float*>(row), reinterpret_cast<float*>(drow), vocab, inv_t, m, ls,
                             h, gl, ge);
          drow[t] += gl * inv_t;  // d logp / dz_t = 1 - p_t: the 1
          continue;
        }
        for (int64_t v = 0; v < vocab; ++v) {
          const acc_t z_minus_max = static_cast<acc_t>(row[v]) * inv_t - m;
          drow[v] = static_cast<scalar_t>(logit_grad<acc_t>(z_minus_max, ls, h, v == t, gl, ge) * inv_t);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(r1k_C, CPU, m) {
  m.impl("token_logprobs_forward", &token_logprobs_forward_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
}

}  // namespace r1k
