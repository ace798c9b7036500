// Multi-scale deformable attention: what the CPU and CUDA kernels share, so the two cannot drift.
//
// - check_inputs: ranks, sizes, dtypes, devices, contiguity and the level layout, run by every
//   kernel (CPU and CUDA) before it touches memory, also when the op runs inside torch.compile;
//   check_grad_output: the backward's incoming gradient against the checked inputs.
// - locate: the sampling coordinate and bilinear corners of one location, compiled for the host
//   and, under nvcc, for the device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CELLVTA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CELLVTA_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace cellvta {

// Checks the op's inputs: value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,)
// int64, sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P); float32 or
// float64, contiguous, all on value's device; the levels tile value's S axis exactly, in order, so
// no index can leave the tensor. Reads the (small) level tensors on the host: on CUDA that is one
// device-to-host copy per call. Errors are ValueError (shapes, layout) or TypeError (dtypes).
void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

// Checks the backward's grad_output: contiguous (N, Lq, M * D) of value's dtype and device.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& sampling_locations);

template <typename T>
CELLVTA_HOST_DEVICE T floor_of(T v) {
#if defined(__CUDA_ARCH__)
  return floor(v);
#else
  return std::floor(v);
#endif
}

// The four neighbours of one sampling location; corner c has row offset `row[c]` within its level
// (row-major, width W) and bilinear weight `weight[c]`, or row -1 when it lies outside the level.
// lh, lw are the fractional parts of the pixel coordinate; hh = 1 - lh, hw = 1 - lw.
template <typename T>
struct Corners {
  int64_t row[4];
  T weight[4];
  T lh, lw, hh, hw;
};

// Pixel coordinate of normalised (x, y) in a level of size (height, width), computed exactly as
// grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) does at grid = 2 * loc - 1:
// (grid + 1) * (size / 2) - 0.5, i.e. loc * size - 0.5. Returns false when the sample reads only
// zeros (also for NaN); otherwise fills `c`.
template <typename T>
CELLVTA_HOST_DEVICE bool locate(T x, T y, int64_t height, int64_t width, Corners<T>& c) {
  const T h = (T(2) * y - T(1) + T(1)) * (T(height) / T(2)) - T(0.5);
  const T w = (T(2) * x - T(1) + T(1)) * (T(width) / T(2)) - T(0.5);
  if (!(h >= T(-1) && w >= T(-1) && h < T(height) && w < T(width))) {
    return false;
  }
  const T h_floor = floor_of(h), w_floor = floor_of(w);
  const int64_t h0 = static_cast<int64_t>(h_floor), w0 = static_cast<int64_t>(w_floor);
  c.lh = h - h_floor;
  c.lw = w - w_floor;
  c.hh = T(1) - c.lh;
  c.hw = T(1) - c.lw;
  const bool top = h0 >= 0, bottom = h0 + 1 < height, left = w0 >= 0, right = w0 + 1 < width;
  c.row[0] = top && left ? h0 * width + w0 : -1;
  c.row[1] = top && right ? h0 * width + w0 + 1 : -1;
  c.row[2] = bottom && left ? (h0 + 1) * width + w0 : -1;
  c.row[3] = bottom && right ? (h0 + 1) * width + w0 + 1 : -1;
  c.weight[0] = c.hh * c.hw;
  c.weight[1] = c.hh * c.lw;
  c.weight[2] = c.lh * c.hw;
  c.weight[3] = c.lh * c.lw;
  return true;
}

}  // namespace cellvta
