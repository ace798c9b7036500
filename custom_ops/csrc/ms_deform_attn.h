// Multi-scale deformable attention: checks shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>

namespace cellvta {

// Ranks, sizes, dtypes (float32/float64, int64 shapes) and contiguity of the op's inputs.
void check_common(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

}  // namespace cellvta
