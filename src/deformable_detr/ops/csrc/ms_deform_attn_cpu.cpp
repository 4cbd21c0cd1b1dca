// Multi-scale deformable attention on the CPU: fused forward and backward.
//
// Semantics are those of ms_deform_attn_reference (grid_sample, bilinear, zeros padding,
// align_corners=False): a location (x, y) in [0, 1] samples pixel coordinates
// (x * W - 0.5, y * H - 0.5), and each of the four bilinear corners that falls outside the map
// contributes zero. Arithmetic runs in float for float/bfloat16/half inputs and in double for double.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

// The four bilinear corners of one sample: flat pixel offsets (-1 when outside) and weights.
template <typename acc_t>
struct Corners {
  int64_t index[4];
  acc_t weight[4];
  // Derivatives of the four weights with respect to the pixel coordinates w and h.
  acc_t dweight_dw[4];
  acc_t dweight_dh[4];
};

template <typename acc_t>
inline Corners<acc_t> bilinear_corners(acc_t x, acc_t y, int64_t height, int64_t width) {
  const acc_t w = x * width - acc_t(0.5);
  const acc_t h = y * height - acc_t(0.5);
  const acc_t w_floor = std::floor(w);
  const acc_t h_floor = std::floor(h);
  const int64_t w0 = static_cast<int64_t>(w_floor);
  const int64_t h0 = static_cast<int64_t>(h_floor);
  const acc_t lw = w - w_floor, lh = h - h_floor;
  const acc_t hw = 1 - lw, hh = 1 - lh;
  Corners<acc_t> c;
  const int64_t hs[4] = {h0, h0, h0 + 1, h0 + 1};
  const int64_t ws[4] = {w0, w0 + 1, w0, w0 + 1};
  const acc_t weights[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
  const acc_t d_dw[4] = {-hh, hh, -lh, lh};
  const acc_t d_dh[4] = {-hw, -lw, hw, lw};
  for (int k = 0; k < 4; ++k) {
    const bool inside = hs[k] >= 0 && hs[k] < height && ws[k] >= 0 && ws[k] < width;
    c.index[k] = inside ? hs[k] * width + ws[k] : -1;
    c.weight[k] = weights[k];
    c.dweight_dw[k] = d_dw[k];
    c.dweight_dh[k] = d_dh[k];
  }
  return c;
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn_cpu: tensors must be on the CPU");
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D)");
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be (N, Lq, M, L, P, 2)");
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be (N, Lq, M, L, P)");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, "spatial_shapes must be (L, 2)");
  TORCH_CHECK(spatial_shapes.size(0) == sampling_locations.size(3) && level_start_index.size(0) == spatial_shapes.size(0),
              "spatial_shapes, level_start_index and sampling_locations disagree on the number of levels");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "value, sampling_locations and attention_weights must share one dtype");
}

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                      const at::Tensor& level_start_index_in, const at::Tensor& sampling_locations_in,
                                      const at::Tensor& attention_weights_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  const auto value = value_in.contiguous();
  const auto spatial_shapes = spatial_shapes_in.to(at::kLong).contiguous();
  const auto level_start_index = level_start_index_in.to(at::kLong).contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();

  const int64_t batch = value.size(0), num_values = value.size(1), heads = value.size(2), channels = value.size(3);
  const int64_t queries = sampling_locations.size(1), levels = sampling_locations.size(3),
                points = sampling_locations.size(4);
  auto output = at::empty({batch, queries, heads * channels}, value.options());
  if (output.numel() == 0) return output;

  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* value_ptr = value.data_ptr<scalar_t>();
    const scalar_t* location_ptr = sampling_locations.data_ptr<scalar_t>();
    const scalar_t* weight_ptr = attention_weights.data_ptr<scalar_t>();
    scalar_t* output_ptr = output.data_ptr<scalar_t>();
    // One task per (batch, query, head): it owns one output row, so no synchronisation is needed.
    at::parallel_for(0, batch * queries * heads, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> accumulator(channels);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t head = task % heads;
        const int64_t n = task / (queries * heads);
        std::fill(accumulator.begin(), accumulator.end(), acc_t(0));
        const scalar_t* locations = location_ptr + task * levels * points * 2;
        const scalar_t* weights = weight_ptr + task * levels * points;
        for (int64_t level = 0; level < levels; ++level) {
          const int64_t height = shapes[2 * level], width = shapes[2 * level + 1];
          // Rows of this level for this batch element and head; pixel i is at row i.
          const scalar_t* level_values = value_ptr + ((n * num_values + starts[level]) * heads + head) * channels;
          const int64_t row_stride = heads * channels;
          for (int64_t point = 0; point < points; ++point) {
            const int64_t sample = level * points + point;
            const acc_t attention = static_cast<acc_t>(weights[sample]);
            const auto corners = bilinear_corners<acc_t>(static_cast<acc_t>(locations[2 * sample]),
                                                         static_cast<acc_t>(locations[2 * sample + 1]), height, width);
            for (int k = 0; k < 4; ++k) {
              if (corners.index[k] < 0) continue;
              const acc_t factor = attention * corners.weight[k];
              const scalar_t* row = level_values + corners.index[k] * row_stride;
              for (int64_t c = 0; c < channels; ++c) accumulator[c] += factor * static_cast<acc_t>(row[c]);
            }
          }
        }
        scalar_t* out = output_ptr + task * channels;  // output (N, Lq, M * D) row of this task
        for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<scalar_t>(accumulator[c]);
      }
    });
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& grad_output_in, const at::Tensor& value_in,
                                                    const at::Tensor& spatial_shapes_in,
                                                    const at::Tensor& level_start_index_in,
                                                    const at::Tensor& sampling_locations_in,
                                                    const at::Tensor& attention_weights_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  const auto grad_output = grad_output_in.contiguous();
  const auto value = value_in.contiguous();
  const auto spatial_shapes = spatial_shapes_in.to(at::kLong).contiguous();
  const auto level_start_index = level_start_index_in.to(at::kLong).contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();

  const int64_t batch = value.size(0), num_values = value.size(1), heads = value.size(2), channels = value.size(3);
  const int64_t queries = sampling_locations.size(1), levels = sampling_locations.size(3),
                points = sampling_locations.size(4);
  const bool reduced_precision = value.scalar_type() == at::kBFloat16 || value.scalar_type() == at::kHalf;
  // Low-precision gradients of value accumulate in float, then round once.
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(reduced_precision ? at::kFloat : value.scalar_type()));
  auto grad_locations = at::zeros(sampling_locations.sizes(), sampling_locations.options());
  auto grad_weights = at::zeros(attention_weights.sizes(), attention_weights.options());
  if (grad_output.numel() > 0) {
    const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
    const int64_t* starts = level_start_index.data_ptr<int64_t>();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* value_ptr = value.data_ptr<scalar_t>();
      const scalar_t* grad_out_ptr = grad_output.data_ptr<scalar_t>();
      const scalar_t* location_ptr = sampling_locations.data_ptr<scalar_t>();
      const scalar_t* weight_ptr = attention_weights.data_ptr<scalar_t>();
      acc_t* grad_value_ptr = grad_value.data_ptr<acc_t>();
      scalar_t* grad_location_ptr = grad_locations.data_ptr<scalar_t>();
      scalar_t* grad_weight_ptr = grad_weights.data_ptr<scalar_t>();
      const int64_t row_stride = heads * channels;
      // One task per (batch, head): it alone writes that slice of grad_value, so accumulation is
      // race-free without atomics; the per-sample gradients are written by their own task too.
      at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> grad_row(channels);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / heads, head = task % heads;
          for (int64_t query = 0; query < queries; ++query) {
            const int64_t row = (n * queries + query) * heads + head;  // (n, query, head)
            const scalar_t* grad_out = grad_out_ptr + row * channels;
            for (int64_t c = 0; c < channels; ++c) grad_row[c] = static_cast<acc_t>(grad_out[c]);
            const scalar_t* locations = location_ptr + row * levels * points * 2;
            const scalar_t* weights = weight_ptr + row * levels * points;
            scalar_t* grad_locations_row = grad_location_ptr + row * levels * points * 2;
            scalar_t* grad_weights_row = grad_weight_ptr + row * levels * points;
            for (int64_t level = 0; level < levels; ++level) {
              const int64_t height = shapes[2 * level], width = shapes[2 * level + 1];
              const int64_t offset = ((n * num_values + starts[level]) * heads + head) * channels;
              const scalar_t* level_values = value_ptr + offset;
              acc_t* level_grad_values = grad_value_ptr + offset;
              for (int64_t point = 0; point < points; ++point) {
                const int64_t sample = level * points + point;
                const acc_t attention = static_cast<acc_t>(weights[sample]);
                const auto corners = bilinear_corners<acc_t>(static_cast<acc_t>(locations[2 * sample]),
                                                             static_cast<acc_t>(locations[2 * sample + 1]), height, width);
                acc_t grad_sample = 0, grad_w = 0, grad_h = 0;
                for (int k = 0; k < 4; ++k) {
                  if (corners.index[k] < 0) continue;
                  const scalar_t* value_row = level_values + corners.index[k] * row_stride;
                  acc_t* grad_value_row = level_grad_values + corners.index[k] * row_stride;
                  const acc_t factor = attention * corners.weight[k];
                  acc_t dot = 0;  // grad_out . value at this corner
                  for (int64_t c = 0; c < channels; ++c) {
                    dot += grad_row[c] * static_cast<acc_t>(value_row[c]);
                    grad_value_row[c] += factor * grad_row[c];
                  }
                  grad_sample += corners.weight[k] * dot;
                  grad_w += corners.dweight_dw[k] * dot;
                  grad_h += corners.dweight_dh[k] * dot;
                }
                grad_weights_row[sample] = static_cast<scalar_t>(grad_sample);
                // d(pixel w)/dx = W and d(pixel h)/dy = H.
                grad_locations_row[2 * sample] = static_cast<scalar_t>(attention * grad_w * width);
                grad_locations_row[2 * sample + 1] = static_cast<scalar_t>(attention * grad_h * height);
              }
            }
          }
        }
      });
    });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ms_deform_attn_cpu_forward, "multi-scale deformable attention, CPU forward");
  m.def("backward", &ms_deform_attn_cpu_backward, "multi-scale deformable attention, CPU backward");
}
