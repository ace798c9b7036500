// Multi-scale deformable attention: CUDA kernels, registered for the CUDA dispatch key.
//
// Same shapes as the CPU kernels in ../ms_deform_attn.cpp; the input checks (check_inputs, check_grad_output) and the
// sampling coordinate (locate) come from ../ms_deform_attn.h, shared with them.
// Forward: one thread per output element (n, q, m, channel). Backward: one thread per sample
// (n, q, m, level, point); it owns that sample's location and weight gradients and adds its
// contribution to grad_value with atomics.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ms_deform_attn.h"

namespace cellvta {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void forward_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const T* __restrict__ locations,
                               const T* __restrict__ weights, T* __restrict__ out, int64_t n, int64_t s, int64_t m,
                               int64_t d, int64_t lq, int64_t levels, int64_t points) {
  const int64_t total = n * lq * m * d;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % d;
    const int64_t nqm = idx / d;
    const int64_t head = nqm % m;
    const int64_t b = nqm / (m * lq);
    const T* loc = locations + nqm * levels * points * 2;
    const T* attn = weights + nqm * levels * points;
    T acc = T(0);
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const T* level = value + ((b * s + starts[l]) * m + head) * d + c;
      for (int64_t p = 0; p < points; ++p, loc += 2, ++attn) {
        Corners<T> cn;
        if (!locate(loc[0], loc[1], height, width, cn)) continue;
        T sample = T(0);
        for (int k = 0; k < 4; ++k) {
          if (cn.row[k] >= 0) sample += cn.weight[k] * level[cn.row[k] * m * d];
        }
        acc += *attn * sample;
      }
    }
    out[idx] = acc;
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const T* __restrict__ locations, const T* __restrict__ weights,
                                T* __restrict__ grad_value, T* __restrict__ grad_locations,
                                T* __restrict__ grad_weights, int64_t n, int64_t s, int64_t m, int64_t d, int64_t lq,
                                int64_t levels, int64_t points) {
  const int64_t total = n * lq * m * levels * points;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = (idx / points) % levels;
    const int64_t nqm = idx / (points * levels);
    const int64_t head = nqm % m;
    const int64_t b = nqm / (m * lq);
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    const T attn = weights[idx];
    Corners<T> cn;
    if (!locate(locations[2 * idx], locations[2 * idx + 1], height, width, cn)) {
      grad_locations[2 * idx] = grad_locations[2 * idx + 1] = grad_weights[idx] = T(0);
      continue;
    }
    const T* go = grad_out + nqm * d;
    const int64_t offset = ((b * s + starts[l]) * m + head) * d;
    T dot[4] = {T(0), T(0), T(0), T(0)};
    for (int k = 0; k < 4; ++k) {
      if (cn.row[k] < 0) continue;
      const T* v = value + offset + cn.row[k] * m * d;
      T* gv = grad_value + offset + cn.row[k] * m * d;
      const T scale = attn * cn.weight[k];
      for (int64_t c = 0; c < d; ++c) {
        dot[k] += go[c] * v[c];
        atomicAdd(gv + c, scale * go[c]);
      }
    }
    grad_weights[idx] =
        cn.weight[0] * dot[0] + cn.weight[1] * dot[1] + cn.weight[2] * dot[2] + cn.weight[3] * dot[3];
    grad_locations[2 * idx] = attn * (cn.hh * (dot[1] - dot[0]) + cn.lh * (dot[3] - dot[2])) * T(width);
    grad_locations[2 * idx + 1] = attn * (cn.hw * (dot[2] - dot[0]) + cn.lw * (dot[3] - dot[1])) * T(height);
  }
}

int blocks_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8));
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = sampling_locations.size(1), levels = sampling_locations.size(3),
                points = sampling_locations.size(4);
  at::Tensor out = at::empty({n, lq, m * d}, value.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
        s, m, d, lq, levels, points);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output, const at::Tensor& value,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(grad_output, value, sampling_locations);
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = sampling_locations.size(1), levels = sampling_locations.size(3),
                points = sampling_locations.size(4);
  // grad_value accumulates with atomicAdd: its summation order varies from run to run
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_weights = at::empty_like(attention_weights);
  const int64_t total = attention_weights.numel();
  if (total == 0) return {grad_value, grad_locations, grad_weights};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
        grad_weights.data_ptr<scalar_t>(), n, s, m, d, lq, levels, points);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(cellvta, CUDA, m) {
  m.impl("ms_deform_attn", &forward_cuda);
  m.impl("ms_deform_attn_backward", &backward_cuda);
}

}  // namespace cellvta
