// CUDA row kernels for token log-probs and entropy. Plain CUDA (no torch headers): the torch
// binding in csrc/bindings.cpp passes raw pointers and the stream, so nvcc compile-checks this
// file for sm_90a on machines without a GPU.
//
// One thread block per row. Forward: each thread reads 16-byte vectors, keeps SoftmaxStats,
// then a warp-shuffle and a shared-memory merge give the row's statistics: one pass over the
// logits. Backward: one read and one write of the row (the write may land in the logits'
// own storage). Rows go on grid axis x (up to 2^31 - 1); element offsets are int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "r1k/cuda_launchers.h"
#include "r1k/softmax_stats.h"

namespace r1k {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of T, loaded and stored as one vector.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ int64_t load_target(const void* targets, bool int32, int64_t row) {
  return int32 ? static_cast<int64_t>(static_cast<const int32_t*>(targets)[row])
               : static_cast<const int64_t*>(targets)[row];
}

__device__ __forceinline__ SoftmaxStats<float> shuffle_stats(const SoftmaxStats<float>& s, int offset) {
  return {__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset),
          __shfl_xor_sync(0xffffffffu, s.tilted, offset)};
}

// Merges every thread's statistics; the block's result is returned to all threads.
__device__ SoftmaxStats<float> block_merge(SoftmaxStats<float> stats) {
  __shared__ SoftmaxStats<float> warp_stats[kWarps];
  __shared__ SoftmaxStats<float> result;
  for (int offset = 16; offset > 0; offset /= 2) stats.merge(shuffle_stats(stats, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_stats[warp] = stats;
  __syncthreads();
  if (warp == 0) {
    stats = lane < kWarps ? warp_stats[lane] : SoftmaxStats<float>::empty();
    for (int offset = 16; offset > 0; offset /= 2) stats.merge(shuffle_stats(stats, offset));
    if (lane == 0) result = stats;
  }
  __syncthreads();
  return result;
}

// Visits every element of a row as (index, value): 16-byte vectors once the row is aligned, a
// scalar head before. With an output row, f's results are stored the same way, so the backward
// is one vectorised read and one vectorised write per element (scalar if the two rows' alignments differ).
template <typename T, typename F>
__device__ __forceinline__ void visit_row(const T* row, T* out, int64_t vocab, F&& f) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t misalign = (reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T);
  const int64_t head = misalign == 0 ? 0 : (kVec - misalign < vocab ? kVec - misalign : vocab);
  auto scalar = [&](int64_t j) {
    const float y = f(j, to_float(row[j]));
    if (out != nullptr) out[j] = from_float<T>(y);
  };
  for (int64_t j = threadIdx.x; j < head; j += kThreads) scalar(j);
  const bool same_alignment = out == nullptr || reinterpret_cast<uintptr_t>(out) % 16 == reinterpret_cast<uintptr_t>(row) % 16;
  const int64_t vectors = same_alignment ? (vocab - head) / kVec : 0;
  const Vec<T>* in_vec = reinterpret_cast<const Vec<T>*>(row + head);
  Vec<T>* out_vec = reinterpret_cast<Vec<T>*>(out + head);
  for (int64_t k = threadIdx.x; k < vectors; k += kThreads) {
    const Vec<T> chunk = in_vec[k];
    Vec<T> result;
#pragma unroll
    for (int e = 0; e < kVec; ++e) result.v[e] = from_float<T>(f(head + k * kVec + e, to_float(chunk.v[e])));
    if (out != nullptr) out_vec[k] = result;
  }
  for (int64_t j = head + vectors * kVec + threadIdx.x; j < vocab; j += kThreads) scalar(j);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(RowsView in, float* logp, float* entropy, float* row_max,
                                                           float* row_log_sum) {
  const int64_t row = blockIdx.x;
  const T* logits = static_cast<const T*>(in.logits) + row * in.row_stride;
  SoftmaxStats<float> stats = SoftmaxStats<float>::empty();
  visit_row(logits, static_cast<T*>(nullptr), in.vocab, [&](int64_t, float x) {
    stats.add(x * in.inv_temperature);
    return 0.f;
  });
  stats = block_merge(stats);
  if (threadIdx.x == 0) {
    const int64_t target = load_target(in.targets, in.targets_int32, row);
    const bool valid = target != kIgnoreIndex;
    const float log_sum = stats.log_sum();
    const float z_target = valid ? to_float(logits[target]) * in.inv_temperature : 0.f;
    logp[row] = valid ? (z_target - stats.max) - log_sum : 0.f;
    entropy[row] = valid ? stats.entropy() : 0.f;
    row_max[row] = stats.max;
    row_log_sum[row] = log_sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(RowsView in, const float* row_max, const float* row_log_sum,
                                                            const float* entropy, const float* grad_logp,
                                                            const float* grad_entropy, T* grad_logits,
                                                            int64_t out_row_stride) {
  const int64_t row = blockIdx.x;
  const T* logits = static_cast<const T*>(in.logits) + row * in.row_stride;
  T* out = grad_logits + row * out_row_stride;
  const int64_t target = load_target(in.targets, in.targets_int32, row);
  const bool valid = target != kIgnoreIndex;
  const float m = row_max[row], log_sum = row_log_sum[row], h = entropy[row];
  const float g_logp = valid ? grad_logp[row] : 0.f;
  const float g_ent = valid && grad_entropy != nullptr ? grad_entropy[row] : 0.f;
  // Each element is read, then written by the same thread: safe when out aliases the logits.
  visit_row(logits, out, in.vocab, [&](int64_t j, float x) {
    return logit_grad<float>(x * in.inv_temperature - m, log_sum, h, j == target, g_logp, g_ent) * in.inv_temperature;
  });
}

template <typename T>
int launch_forward(const RowsView& in, float* logp, float* entropy, float* row_max, float* row_log_sum,
                   cudaStream_t stream) {
  forward_kernel<T><<<static_cast<unsigned>(in.rows), kThreads, 0, stream>>>(in, logp, entropy, row_max, row_log_sum);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const RowsView& in, const float* row_max, const float* row_log_sum, const float* entropy,
                    const float* grad_logp, const float* grad_entropy, void* grad_logits, int64_t out_row_stride,
                    cudaStream_t stream) {
  backward_kernel<T><<<static_cast<unsigned>(in.rows), kThreads, 0, stream>>>(
      in, row_max, row_log_sum, entropy, grad_logp, grad_entropy, static_cast<T*>(grad_logits), out_row_stride);
  return static_cast<int>(cudaGetLastError());
}

constexpr int64_t kMaxGridX = 2147483647;

}  // namespace

int token_logprobs_forward(const RowsView& in, float* logp, float* entropy, float* row_max, float* row_log_sum,
                           void* stream) {
  if (in.rows == 0) return 0;
  if (in.rows > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  auto s = static_cast<cudaStream_t>(stream);
  switch (in.dtype) {
    case Dtype::kFloat32: return launch_forward<float>(in, logp, entropy, row_max, row_log_sum, s);
    case Dtype::kFloat16: return launch_forward<__half>(in, logp, entropy, row_max, row_log_sum, s);
    case Dtype::kBFloat16: return launch_forward<__nv_bfloat16>(in, logp, entropy, row_max, row_log_sum, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int token_logprobs_backward(const RowsView& in, const float* row_max, const float* row_log_sum, const float* entropy,
                            const float* grad_logp, const float* grad_entropy, void* grad_logits, int64_t out_row_stride,
                            void* stream) {
  if (in.rows == 0) return 0;
  if (in.rows > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  auto s = static_cast<cudaStream_t>(stream);
  switch (in.dtype) {
    case Dtype::kFloat32:
      return launch_backward<float>(in, row_max, row_log_sum, entropy, grad_logp, grad_entropy, grad_logits, out_row_stride, s);
    case Dtype::kFloat16:
      return launch_backward<__half>(in, row_max, row_log_sum, entropy, grad_logp, grad_entropy, grad_logits, out_row_stride, s);
    case Dtype::kBFloat16:
      return launch_backward<__nv_bfloat16>(in, row_max, row_log_sum, entropy, grad_logp, grad_entropy, grad_logits,
                                            out_row_stride, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace r1k
