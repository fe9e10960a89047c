// Plain-C++ entry points of the CUDA kernels in csrc/cuda/. No torch and no CUDA headers here:
// the torch binding (bindings.cpp) calls these with raw pointers and the current stream.
#pragma once

#include <cstdint>

namespace r1k {
namespace cuda {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RowsView {
  const void* logits;      // [rows, vocab], unit stride along vocab
  int64_t row_stride;      // elements between rows
  Dtype dtype;
  const void* targets;     // [rows]
  bool targets_int32;      // else int64
  int64_t rows;
  int64_t vocab;
  float inv_temperature;
};

// logp, entropy, row_max, row_log_sum: fp32 [rows]. Returns a cudaError_t as int (0 = success).
int token_logprobs_forward(const RowsView& in, float* logp, float* entropy, float* row_max,
                           float* row_log_sum, void* stream);

// Writes d logits (the logits' dtype, unit stride along vocab, out_row_stride between rows) to
// grad_logits, which may alias in.logits. grad_entropy may be null.
int token_logprobs_backward(const RowsView& in, const float* row_max, const float* row_log_sum,
                            const float* entropy, const float* grad_logp, const float* grad_entropy,
                            void* grad_logits, int64_t out_row_stride, void* stream);

struct GroupsView {
  const float* rewards;        // [B, R] fp32, unit stride along R
  int64_t row_stride;
  int64_t num_rewards;         // R
  const double* weights;       // [R], or null: one unweighted column read as it is, else all ones
  int64_t groups;
  int64_t group_size;          // contiguous groups when offsets is null
  const int64_t* offsets;      // [groups + 1] segment starts into perm, or null
  const int64_t* perm;         // [B] row of each segment position, or null
  int estimator;               // r1k::GroupEstimator
  int scale;                   // r1k::GroupScale
  float eps;
  const float* batch_denominator;  // device scalar, read when scale is batch
};

// adv [B], mean/std [groups] fp32, constant [groups] bool.
int group_advantages(const GroupsView& in, float* adv, float* mean, float* std, bool* constant, void* stream);

}  // namespace cuda
}  // namespace r1k
