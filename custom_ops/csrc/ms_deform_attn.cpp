// Multi-scale deformable attention: operator schema and CPU kernels.
//
// Shapes: value (N, S, M, D), spatial_shapes (L, 2) int64 (H, W), level_start_index (L,) int64,
// sampling_locations (N, Lq, M, L, P, 2) normalised (x, y), attention_weights (N, Lq, M, L, P),
// output (N, Lq, M * D). Bilinear sampling equals grid_sample(bilinear, zeros, align_corners=False).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
// One binary, vectorised for the CPU it runs on: the loader picks the clone at start-up.
#define CELLVTA_SIMD_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define CELLVTA_SIMD_CLONES
#endif

#define CELLVTA_INLINE inline __attribute__((always_inline))

namespace cellvta {

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                    "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ",
                    attention_weights.sizes());
  const int64_t n = value.size(0), m = value.size(2);
  const int64_t levels = sampling_locations.size(3);
  TORCH_CHECK_VALUE(sampling_locations.size(0) == n && sampling_locations.size(2) == m,
                    "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " do not match value ",
                    value.sizes());
  TORCH_CHECK_VALUE(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "ms_deform_attn: attention_weights ", attention_weights.sizes(),
                    " do not match sampling_locations ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == levels && spatial_shapes.size(1) == 2,
                    "ms_deform_attn: spatial_shapes must be (L, 2) with L = ", levels, ", got ",
                    spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
                    "ms_deform_attn: level_start_index must be (L,) with L = ", levels, ", got ",
                    level_start_index.sizes());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
                   "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK_TYPE(value.scalar_type() == sampling_locations.scalar_type() &&
                       value.scalar_type() == attention_weights.scalar_type(),
                   "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype");
  TORCH_CHECK_TYPE(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
                   "ms_deform_attn: float32 or float64 expected, got ", value.scalar_type());
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK_VALUE(t->device() == value.device(), "ms_deform_attn: every input must be on value's device ",
                      value.device(), ", got one on ", t->device());
  }
  TORCH_CHECK_VALUE(value.is_contiguous() && sampling_locations.is_contiguous() && attention_weights.is_contiguous() &&
                        spatial_shapes.is_contiguous() && level_start_index.is_contiguous(),
                    "ms_deform_attn: inputs must be contiguous");
  // The level layout, read on the host (one small copy when the tensors live on a device).
  const at::Tensor layout = at::cat({spatial_shapes.flatten(), level_start_index}).to(at::kCPU);
  const int64_t* shapes = layout.data_ptr<int64_t>();
  const int64_t* starts = shapes + 2 * levels;
  int64_t offset = 0;
  for (int64_t l = 0; l < levels; ++l) {
    TORCH_CHECK_VALUE(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0, "ms_deform_attn: spatial_shapes[", l,
                      "] must be positive, got (", shapes[2 * l], ", ", shapes[2 * l + 1], ")");
    TORCH_CHECK_VALUE(starts[l] == offset, "ms_deform_attn: level_start_index[", l, "] is ", starts[l],
                      " but the preceding levels of spatial_shapes end at ", offset);
    offset += shapes[2 * l] * shapes[2 * l + 1];
  }
  TORCH_CHECK_VALUE(offset == value.size(1), "ms_deform_attn: spatial_shapes describe ", offset,
                    " values but value has S = ", value.size(1));
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& sampling_locations) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({value.size(0), sampling_locations.size(1),
                                                      value.size(2) * value.size(3)}) &&
                  grad_output.scalar_type() == value.scalar_type() && grad_output.is_contiguous() &&
                  grad_output.device() == value.device(),
              "ms_deform_attn_backward: grad_output must be a contiguous (N, Lq, M * D) tensor of value's dtype "
              "and device");
}

namespace {

struct Geometry {
  int64_t n, s, m, d, lq, levels, points;
  const int64_t* shapes;
  const int64_t* starts;
};

Geometry geometry(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations) {
  return {value.size(0),
          value.size(1),
          value.size(2),
          value.size(3),
          sampling_locations.size(1),
          sampling_locations.size(3),
          sampling_locations.size(4),
          spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>()};
}

template <typename T>
struct ForwardArgs {
  Geometry g;
  const T* value;
  const T* locations;
  const T* weights;
  T* out;
};

// Output rows (n, q) in [begin, end): out[n, q, m, :] = sum over (l, p, corner) of weight * value row.
template <typename T>
CELLVTA_INLINE void forward_rows(const ForwardArgs<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t d = g.d, value_row = g.m * d, samples = g.levels * g.points;
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / g.lq;
    for (int64_t m = 0; m < g.m; ++m) {
      T* __restrict__ out = a.out + (nq * g.m + m) * d;
      std::fill(out, out + d, T(0));
      const T* loc = a.locations + (nq * g.m + m) * samples * 2;
      const T* attn = a.weights + (nq * g.m + m) * samples;
      for (int64_t l = 0; l < g.levels; ++l) {
        const int64_t height = g.shapes[2 * l], width = g.shapes[2 * l + 1];
        const T* level = a.value + ((n * g.s + g.starts[l]) * g.m + m) * d;
        for (int64_t p = 0; p < g.points; ++p, loc += 2, ++attn) {
          Corners<T> c;
          if (!locate(loc[0], loc[1], height, width, c)) continue;
          for (int k = 0; k < 4; ++k) {
            if (c.row[k] < 0) continue;
            const T scale = *attn * c.weight[k];
            const T* __restrict__ v = level + c.row[k] * value_row;
            for (int64_t i = 0; i < d; ++i) out[i] += scale * v[i];
          }
        }
      }
    }
  }
}

template <typename T>
struct BackwardArgs {
  Geometry g;
  const T* grad_out;
  const T* value;
  const T* locations;
  const T* weights;
  T* grad_value;  // (N, S, M, D), or per-chunk buffers (N, M, chunks, S, D)
  T* grad_locations;
  T* grad_weights;
  int64_t chunks;
  bool buffered;
};

// Tasks (n, m, chunk) in [begin, end): each owns its head's grad_value slice (or its buffer),
// so no two tasks write the same memory.
template <typename T>
CELLVTA_INLINE void backward_tasks(const BackwardArgs<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t d = g.d, samples = g.levels * g.points;
  const int64_t per_chunk = (g.lq + a.chunks - 1) / a.chunks;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task % a.chunks, nm = task / a.chunks;
    const int64_t n = nm / g.m, m = nm % g.m;
    const int64_t q_begin = chunk * per_chunk, q_end = std::min(g.lq, q_begin + per_chunk);
    // Row stride and origin of this task's grad_value view.
    const int64_t grad_row = a.buffered ? d : g.m * d;
    T* grad_head = a.buffered ? a.grad_value + task * g.s * d : a.grad_value + (n * g.s * g.m + m) * d;
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t nqm = (n * g.lq + q) * g.m + m;
      const T* __restrict__ go = a.grad_out + nqm * d;
      const T* loc = a.locations + nqm * samples * 2;
      const T* attn = a.weights + nqm * samples;
      T* grad_loc = a.grad_locations + nqm * samples * 2;
      T* grad_attn = a.grad_weights + nqm * samples;
      for (int64_t l = 0; l < g.levels; ++l) {
        const int64_t height = g.shapes[2 * l], width = g.shapes[2 * l + 1];
        const T* level = a.value + ((n * g.s + g.starts[l]) * g.m + m) * d;
        T* grad_level = grad_head + g.starts[l] * grad_row;
        for (int64_t p = 0; p < g.points; ++p, loc += 2, ++attn, grad_loc += 2, ++grad_attn) {
          Corners<T> c;
          if (!locate(loc[0], loc[1], height, width, c)) {
            grad_loc[0] = grad_loc[1] = *grad_attn = T(0);
            continue;
          }
          T dot[4] = {T(0), T(0), T(0), T(0)};
          for (int k = 0; k < 4; ++k) {
            if (c.row[k] < 0) continue;
            const T scale = *attn * c.weight[k];
            const T* __restrict__ v = level + c.row[k] * g.m * d;
            T* __restrict__ gv = grad_level + c.row[k] * grad_row;
            T acc = T(0);
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < d; ++i) {
              acc += go[i] * v[i];
              gv[i] += scale * go[i];
            }
            dot[k] = acc;
          }
          *grad_attn = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] + c.weight[3] * dot[3];
          const T grad_w = c.hh * (dot[1] - dot[0]) + c.lh * (dot[3] - dot[2]);
          const T grad_h = c.hw * (dot[2] - dot[0]) + c.lw * (dot[3] - dot[1]);
          grad_loc[0] = *attn * grad_w * T(width);
          grad_loc[1] = *attn * grad_h * T(height);
        }
      }
    }
  }
}

CELLVTA_SIMD_CLONES void forward_rows_f32(const ForwardArgs<float>& a, int64_t b, int64_t e) { forward_rows(a, b, e); }
CELLVTA_SIMD_CLONES void forward_rows_f64(const ForwardArgs<double>& a, int64_t b, int64_t e) { forward_rows(a, b, e); }
CELLVTA_SIMD_CLONES void backward_tasks_f32(const BackwardArgs<float>& a, int64_t b, int64_t e) {
  backward_tasks(a, b, e);
}
CELLVTA_SIMD_CLONES void backward_tasks_f64(const BackwardArgs<double>& a, int64_t b, int64_t e) {
  backward_tasks(a, b, e);
}

void run_forward(const ForwardArgs<float>& a, int64_t b, int64_t e) { forward_rows_f32(a, b, e); }
void run_forward(const ForwardArgs<double>& a, int64_t b, int64_t e) { forward_rows_f64(a, b, e); }
void run_backward(const BackwardArgs<float>& a, int64_t b, int64_t e) { backward_tasks_f32(a, b, e); }
void run_backward(const BackwardArgs<double>& a, int64_t b, int64_t e) { backward_tasks_f64(a, b, e); }

// Enough multiply-adds per parallel chunk to amortise the thread hand-off.
int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_item)); }

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Geometry g = geometry(value, spatial_shapes, level_start_index, sampling_locations);
  at::Tensor out = at::empty({g.n, g.lq, g.m * g.d}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const ForwardArgs<scalar_t> args{g, value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                                     attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>()};
    at::parallel_for(0, g.n * g.lq, grain(g.m * g.levels * g.points * 4 * g.d),
                     [&](int64_t begin, int64_t end) { run_forward(args, begin, end); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output, const at::Tensor& value,
                                                            const at::Tensor& spatial_shapes,
                                                            const at::Tensor& level_start_index,
                                                            const at::Tensor& sampling_locations,
                                                            const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(grad_output, value, sampling_locations);
  const Geometry g = geometry(value, spatial_shapes, level_start_index, sampling_locations);
  // Heads are independent; when there are too few of them to keep every thread busy, the
  // queries of a head are split into chunks that accumulate into private buffers.
  const int64_t heads = g.n * g.m, threads = at::get_num_threads();
  int64_t chunks = 1;
  if (heads < 2 * threads) {
    chunks = std::min<int64_t>((2 * threads + heads - 1) / heads, std::max<int64_t>(1, g.lq / 16));
  }
  const bool buffered = chunks > 1;
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_weights = at::empty_like(attention_weights);
  at::Tensor buffer = buffered ? at::zeros({g.n, g.m, chunks, g.s, g.d}, value.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const BackwardArgs<scalar_t> args{g,
                                      grad_output.data_ptr<scalar_t>(),
                                      value.data_ptr<scalar_t>(),
                                      sampling_locations.data_ptr<scalar_t>(),
                                      attention_weights.data_ptr<scalar_t>(),
                                      buffered ? buffer.data_ptr<scalar_t>() : grad_value.data_ptr<scalar_t>(),
                                      grad_locations.data_ptr<scalar_t>(),
                                      grad_weights.data_ptr<scalar_t>(),
                                      chunks,
                                      buffered};
    at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) { run_backward(args, begin, end); });
  });
  if (buffered) {
    // (N, M, chunks, S, D) -> (N, S, M, D)
    grad_value.copy_(buffer.sum(2).permute({0, 2, 1, 3}));
  }
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY(cellvta, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cellvta, CPU, m) {
  m.impl("ms_deform_attn", &forward_cpu);
  m.impl("ms_deform_attn_backward", &backward_cpu);
}

}  // namespace cellvta
