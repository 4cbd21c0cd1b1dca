// Multi-scale deformable attention on the CPU: fused forward and backward.
//
// Semantics are those of ms_deform_attn_reference (grid_sample, bilinear, zeros padding,
// align_corners=False): a location (x, y) in [0, 1] samples pixel coordinates
// (x * W - 0.5, y * H - 0.5), and each of the four bilinear corners that falls outside the map
// contributes zero. Arithmetic runs in float for float/bfloat16/half inputs and in double for double.
//
// Layouts (all contiguous): value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2),
// attention_weights (N, Lq, M, L, P), output (N, Lq, M * D). All share one dtype, except that the
// locations may be float32 beside bfloat16 or float16 values and weights. A "row" is the D channels
// of one head at one position; the rows of one position's heads are adjacent, M * D apart.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// Per sampling point (level, point) of a query: the level's size and first position in S.
struct SampleLevels {
  std::vector<float> width, height;
  std::vector<int32_t> start;

  SampleLevels(const int64_t* shapes, const int64_t* starts, int64_t levels, int64_t points) {
    for (int64_t level = 0; level < levels; ++level) {
      for (int64_t point = 0; point < points; ++point) {
        height.push_back(static_cast<float>(shapes[2 * level]));
        width.push_back(static_cast<float>(shapes[2 * level + 1]));
        start.push_back(static_cast<int32_t>(starts[level]));
      }
    }
  }
};

// Clamps a pixel coordinate to [-2, size + 1] (NaN to -2) so that it converts to an integer
// safely; every corner of a clamped point is outside the map, as it was before clamping. Plain
// comparisons, unlike std::fmin/fmax, vectorise.
template <typename acc_t>
inline acc_t clamp_outside(acc_t coordinate, acc_t size) {
  coordinate = coordinate >= acc_t(-2) ? coordinate : acc_t(-2);
  return coordinate <= size + 1 ? coordinate : size + 1;
}

// The four bilinear corners (top-left, top-right, bottom-left, bottom-right) of every sampling
// point of one (batch, query, head) row, laid out corner-major so that the loop computing them
// vectorises across points. position is the corner's index in S, or -1 outside the map: such
// corners are skipped, not weighted by 0, so a non-finite value elsewhere cannot leak in.
template <typename acc_t>
struct Corners {
  std::vector<int32_t> position;  // [4][samples]
  std::vector<acc_t> weight;      // bilinear weights, [4][samples]
  std::vector<acc_t> frac_w, frac_h;  // fractional pixel coordinates, [samples], for gradients
  int64_t samples;

  explicit Corners(int64_t samples)
      : position(4 * samples), weight(4 * samples), frac_w(samples), frac_h(samples), samples(samples) {}

  template <typename scalar_t>
  void compute(const scalar_t* __restrict__ locations, const SampleLevels& levels) {
    const float* __restrict__ widths = levels.width.data();
    const float* __restrict__ heights = levels.height.data();
    const int32_t* __restrict__ starts = levels.start.data();
    int32_t* __restrict__ pos = position.data();
    acc_t* __restrict__ wgt = weight.data();
    acc_t* __restrict__ fw = frac_w.data();
    acc_t* __restrict__ fh = frac_h.data();
    const int64_t n = samples;
#pragma omp simd
    for (int64_t s = 0; s < n; ++s) {
      const acc_t width = widths[s], height = heights[s];
      const acc_t w = clamp_outside(static_cast<acc_t>(locations[2 * s]) * width - acc_t(0.5), width);
      const acc_t h = clamp_outside(static_cast<acc_t>(locations[2 * s + 1]) * height - acc_t(0.5), height);
      const acc_t w_floor = std::floor(w), h_floor = std::floor(h);
      const int32_t w0 = static_cast<int32_t>(w_floor), h0 = static_cast<int32_t>(h_floor);
      const int32_t map_width = static_cast<int32_t>(width), map_height = static_cast<int32_t>(height);
      const acc_t lw = w - w_floor, lh = h - h_floor;
      const bool left = w0 >= 0, right = w0 + 1 < map_width, top = h0 >= 0, bottom = h0 + 1 < map_height;
      const bool x0_in = left && w0 < map_width, x1_in = w0 + 1 >= 0 && right;
      const bool y0_in = top && h0 < map_height, y1_in = h0 + 1 >= 0 && bottom;
      const int32_t top_left = starts[s] + h0 * map_width + w0;
      pos[s] = y0_in && x0_in ? top_left : -1;
      pos[n + s] = y0_in && x1_in ? top_left + 1 : -1;
      pos[2 * n + s] = y1_in && x0_in ? top_left + map_width : -1;
      pos[3 * n + s] = y1_in && x1_in ? top_left + map_width + 1 : -1;
      wgt[s] = (1 - lh) * (1 - lw);
      wgt[n + s] = (1 - lh) * lw;
      wgt[2 * n + s] = lh * (1 - lw);
      wgt[3 * n + s] = lh * lw;
      fw[s] = lw;
      fh[s] = lh;
    }
  }
};

// A head's rows lie M * D apart in (N, S, M, D) (1 kB at D = 32, M = 8), which maps them onto an
// eighth of the cache's sets. Where a task samples a head more often than the head has positions
// (the encoder: every position is sampled L * P times a head), it first copies the head's rows into
// a contiguous buffer of its own, reused from head to head, and gathers from that instead.
template <typename scalar_t>
void copy_head(const scalar_t* head_rows, int64_t row_stride, int64_t positions, int64_t channels,
               std::vector<scalar_t>& copy) {
  copy.resize(positions * channels);
  for (int64_t s = 0; s < positions; ++s) std::copy_n(head_rows + s * row_stride, channels, copy.data() + s * channels);
}

// The dot products of one channel row with the rows of a sample's four corners (0 for a corner
// outside the map). Summing each product across a vector's lanes takes several shuffles, so on AVX2
// the four float32 sums are folded together, at a quarter of that cost.
template <typename scalar_t, typename acc_t, int64_t kChannels>
inline void corner_dots(const acc_t* row, const scalar_t* values, int64_t row_stride, const int32_t* positions,
                        int64_t samples, int64_t channels, acc_t* dots) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float> && kChannels > 0 && kChannels % 8 == 0) {
    alignas(32) static constexpr float kZeros[kChannels] = {};
    __m256 sums[4];
    for (int k = 0; k < 4; ++k) {
      const int32_t position = positions[k * samples];
      const float* corner = position < 0 ? kZeros : values + position * row_stride;
      sums[k] = _mm256_mul_ps(_mm256_loadu_ps(row), _mm256_loadu_ps(corner));
      for (int64_t c = 8; c < kChannels; c += 8) {
        sums[k] = _mm256_fmadd_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(corner + c), sums[k]);
      }
    }
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(sums[0], sums[1]), _mm256_hadd_ps(sums[2], sums[3]));
    _mm_storeu_ps(dots, _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
    return;
  }
#endif
  for (int k = 0; k < 4; ++k) {
    const int32_t position = positions[k * samples];
    acc_t dot = 0;
    if (position >= 0) {
      const scalar_t* __restrict__ corner = values + position * row_stride;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < channels; ++c) dot += row[c] * static_cast<acc_t>(corner[c]);
    }
    dots[k] = dot;
  }
}

// The loops take the channel count D as a template argument where it is a common value (16: the
// tiny preset, 32: the published models), so the compiler unrolls them and keeps the accumulators
// in vector registers; kChannels = 0 handles any other D at run time.
template <typename scalar_t, typename location_t, int64_t kChannels>
struct Kernels {
  using acc_t = at::opmath_type<scalar_t>;

  static void forward(const scalar_t* value, const SampleLevels& sample_levels, const location_t* locations,
                      const scalar_t* weights, scalar_t* output, int64_t batch, int64_t num_values, int64_t heads,
                      int64_t runtime_channels, int64_t queries, int64_t samples) {
    const int64_t channels = kChannels > 0 ? kChannels : runtime_channels;
    // One task per (batch, query, head) row owns its output: no synchronisation needed. Tasks run
    // head by head, not query by query, so that a thread gathers from one head's slice of one
    // image's values (S x D: 2.3 MB at COCO scale in float32) rather than from all of them at
    // once (18 MB an image): what the threads read together then stays in cache.
    at::parallel_for(0, batch * heads * queries, 64, [&](int64_t begin, int64_t end) {
      Corners<acc_t> corners(samples);
      std::vector<acc_t> runtime_accumulator(kChannels > 0 ? 0 : channels);
      acc_t fixed_accumulator[kChannels > 0 ? kChannels : 1];
      acc_t* __restrict__ accumulator = kChannels > 0 ? fixed_accumulator : runtime_accumulator.data();
      std::vector<scalar_t> head_copy;
      const scalar_t* head_values = nullptr;
      int64_t row_stride = heads * channels;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / (heads * queries), head = task / queries % heads, query = task % queries;
        const int64_t row = (n * queries + query) * heads + head;
        if (task == begin || query == 0) {  // the first row of this task range's next head
          head_values = value + (n * num_values * heads + head) * channels;
          row_stride = heads * channels;
          if (std::min(end - task, queries - query) * samples >= num_values) {
            copy_head(head_values, row_stride, num_values, channels, head_copy);
            head_values = head_copy.data();
            row_stride = channels;
          }
        }
        const scalar_t* row_weights = weights + row * samples;
        corners.compute(locations + row * samples * 2, sample_levels);
        for (int64_t c = 0; c < channels; ++c) accumulator[c] = 0;
        for (int64_t s = 0; s < samples; ++s) {
          const acc_t attention = static_cast<acc_t>(row_weights[s]);
          for (int k = 0; k < 4; ++k) {
            const int32_t position = corners.position[k * samples + s];
            if (position < 0) continue;
            const scalar_t* __restrict__ value_row = head_values + position * row_stride;
            const acc_t factor = attention * corners.weight[k * samples + s];
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) accumulator[c] += factor * static_cast<acc_t>(value_row[c]);
          }
        }
        scalar_t* out = output + row * channels;
        for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<scalar_t>(accumulator[c]);
      }
    });
  }

  static void backward(const scalar_t* grad_output, const scalar_t* value, const SampleLevels& sample_levels,
                       const location_t* locations, const scalar_t* weights, acc_t* grad_value_in_place, scalar_t* grad_value,
                       location_t* grad_locations, scalar_t* grad_weights, int64_t batch, int64_t num_values, int64_t heads,
                       int64_t runtime_channels, int64_t queries, int64_t samples, bool head_copies) {
    const int64_t channels = kChannels > 0 ? kChannels : runtime_channels;
    const int64_t position_stride = heads * channels;  // between a head's rows in (N, S, M, D)
    // The value gradient is (N, S, M, D): with head_copies in scalar_t, written once per head;
    // without, in acc_t, zeroed, and accumulated in place.
    // One task per (batch, head): it alone writes that slice of the value gradient, so the
    // scattered accumulation is race-free without atomics; per-sample gradients belong to their row.
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      Corners<acc_t> corners(samples);
      std::vector<acc_t> runtime_grad(kChannels > 0 ? 0 : channels);
      acc_t fixed_grad[kChannels > 0 ? kChannels : 1];
      acc_t* __restrict__ grad_row = kChannels > 0 ? fixed_grad : runtime_grad.data();
      // With head copies, the gradient of the head's rows accumulates in a contiguous buffer too,
      // written out once the head is done.
      std::vector<scalar_t> head_value;
      std::vector<acc_t> head_grad(head_copies ? num_values * channels : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / heads, head = task % heads;
        const int64_t head_offset = (n * num_values * heads + head) * channels;  // the head's first row
        const scalar_t* head_values = value + head_offset;
        acc_t* head_gradient = nullptr;
        int64_t row_stride = position_stride;
        if (head_copies) {
          copy_head(head_values, position_stride, num_values, channels, head_value);
          std::fill(head_grad.begin(), head_grad.end(), acc_t(0));
          head_values = head_value.data();
          head_gradient = head_grad.data();
          row_stride = channels;
        } else {
          head_gradient = grad_value_in_place + head_offset;
        }
        for (int64_t query = 0; query < queries; ++query) {
          const int64_t row = (n * queries + query) * heads + head;  // (n, query, head)
          const scalar_t* grad_out = grad_output + row * channels;
          for (int64_t c = 0; c < channels; ++c) grad_row[c] = static_cast<acc_t>(grad_out[c]);
          const scalar_t* row_weights = weights + row * samples;
          corners.compute(locations + row * samples * 2, sample_levels);
          location_t* row_grad_locations = grad_locations + row * samples * 2;
          scalar_t* row_grad_weights = grad_weights + row * samples;
          for (int64_t s = 0; s < samples; ++s) {
            const acc_t attention = static_cast<acc_t>(row_weights[s]);
            const acc_t lw = corners.frac_w[s], lh = corners.frac_h[s];
            acc_t grad_dots[4];  // the output gradient's dot product with each corner's value row
            corner_dots<scalar_t, acc_t, kChannels>(grad_row, head_values, row_stride, corners.position.data() + s,
                                                    samples, channels, grad_dots);
            acc_t grad_s = 0, grad_ws = 0, grad_hs = 0;
            for (int k = 0; k < 4; ++k) {
              const int32_t position = corners.position[k * samples + s];
              if (position < 0) continue;
              acc_t* __restrict__ grad_value_row = head_gradient + position * row_stride;
              const acc_t weight = corners.weight[k * samples + s];
              const acc_t factor = attention * weight;
#pragma omp simd
              for (int64_t c = 0; c < channels; ++c) grad_value_row[c] += factor * grad_row[c];
              const acc_t grad_dot_value = grad_dots[k];
              // d(weight)/d(lw) and d(weight)/d(lh) of corner k: a sign times the other fraction.
              const bool right = k & 1, bottom = k & 2;
              grad_s += weight * grad_dot_value;
              grad_ws += (right ? 1 : -1) * (bottom ? lh : 1 - lh) * grad_dot_value;
              grad_hs += (bottom ? 1 : -1) * (right ? lw : 1 - lw) * grad_dot_value;
            }
            row_grad_weights[s] = static_cast<scalar_t>(grad_s);
            // The pixel coordinates are x * W - 0.5 and y * H - 0.5.
            row_grad_locations[2 * s] = static_cast<location_t>(attention * grad_ws * sample_levels.width[s]);
            row_grad_locations[2 * s + 1] = static_cast<location_t>(attention * grad_hs * sample_levels.height[s]);
          }
        }
        if (head_copies) {
          scalar_t* out = grad_value + head_offset;
          for (int64_t s = 0; s < num_values; ++s) {
            for (int64_t c = 0; c < channels; ++c) {
              out[s * position_stride + c] = static_cast<scalar_t>(head_grad[s * channels + c]);
            }
          }
        }
      }
    });
  }
};

// Calls body(std::integral_constant<int64_t, D>) with D fixed where it is a common value, else 0.
template <typename Body>
void dispatch_channels(int64_t channels, const Body& body) {
  switch (channels) {
    case 16:
      body(std::integral_constant<int64_t, 16>{});
      break;
    case 32:
      body(std::integral_constant<int64_t, 32>{});
      break;
    default:
      body(std::integral_constant<int64_t, 0>{});
  }
}

// Calls body(location) with a value of the locations' C++ type: value's own, or float beside a
// bfloat16 or float16 value (autocast keeps the model's locations in float32).
template <typename scalar_t, typename Body>
void dispatch_locations(at::ScalarType locations, const Body& body) {
  if constexpr (std::is_same_v<at::opmath_type<scalar_t>, scalar_t>) {
    body(scalar_t{});
  } else if (locations == at::kFloat) {
    body(float{});
  } else {
    body(scalar_t{});
  }
}

// bfloat16 and float16: computed in float, and may come with float32 sampling locations.
inline bool is_reduced_precision(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// The op's large outputs (the value gradient, 36 MB in r50 at batch 2 and COCO size, and in the
// encoder the output and the location gradient) live in blocks it keeps once their
// tensors are freed. glibc maps every allocation of 32 MB or more fresh from the system and unmaps
// it when freed, so each call faulted in and zeroed its pages anew: 10-11 ms for 36 MB, against
// 0.7 ms to zero a block already mapped. A block is reused for a tensor of its size or up to a fifth
// smaller (a fixed-size run asks for the same sizes call after call); the cache keeps at most
// kMaxHeldBytes of blocks no tensor uses, dropping the oldest first. Like torch's own CPU allocator,
// it reports the blocks its tensors hold to the profiler (``profile_memory``).
class BlockCache {
 public:
  static constexpr size_t kMinBytes = size_t(32) << 20;  // smaller ones glibc reuses itself
  static constexpr size_t kMaxHeldBytes = size_t(256) << 20;

  // A block of at least ``bytes``, and its size.
  std::pair<void*, size_t> take(size_t bytes) {
    std::pair<void*, size_t> block{nullptr, bytes};
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto held = held_.begin(); held != held_.end(); ++held) {
      if (held->second >= bytes && held->second <= bytes + bytes / 4) {
        block = *held;
        held_.erase(held);
        held_bytes_ -= block.second;
        break;
      }
    }
    if (block.first == nullptr) block.first = c10::alloc_cpu(bytes);
    in_use_bytes_ += block.second;
    report(block.first, static_cast<int64_t>(block.second));
    return block;
  }

  void give(void* data, size_t bytes) {
    std::vector<void*> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ -= bytes;
      report(data, -static_cast<int64_t>(bytes));
      held_.emplace_back(data, bytes);
      held_bytes_ += bytes;
      while (held_bytes_ > kMaxHeldBytes) {
        dropped.push_back(held_.front().first);
        held_bytes_ -= held_.front().second;
        held_.pop_front();
      }
    }
    for (void* block : dropped) c10::free_cpu(block);
  }

 private:
  void report(void* data, int64_t change) const {
    c10::reportMemoryUsageToProfiler(data, change, in_use_bytes_, in_use_bytes_ + held_bytes_, c10::Device(c10::kCPU));
  }

  std::mutex mutex_;
  std::deque<std::pair<void*, size_t>> held_;  // the blocks no tensor uses, oldest first
  size_t held_bytes_ = 0, in_use_bytes_ = 0;
};

// An uninitialised tensor, in a block of the cache where it is large.
at::Tensor new_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (bytes < BlockCache::kMinBytes) return at::empty(sizes, options);
  // Never destroyed: a tensor may outlive the library's static objects at exit.
  static BlockCache* const cache = new BlockCache();
  const auto [data, capacity] = cache->take(bytes);
  return at::from_blob(data, sizes, [capacity = capacity](void* block) { cache->give(block, capacity); }, options);
}

struct Inputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
  int64_t batch, num_values, heads, channels, queries, levels, points;

  Inputs(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
         const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in) {
    TORCH_CHECK(value_in.device().is_cpu(), "ms_deform_attn_cpu: tensors must be on the CPU");
    TORCH_CHECK(value_in.dim() == 4, "value must be (N, S, M, D)");
    TORCH_CHECK(sampling_locations_in.dim() == 6 && sampling_locations_in.size(5) == 2,
                "sampling_locations must be (N, Lq, M, L, P, 2)");
    TORCH_CHECK(attention_weights_in.dim() == 5, "attention_weights must be (N, Lq, M, L, P)");
    TORCH_CHECK(spatial_shapes_in.dim() == 2 && spatial_shapes_in.size(1) == 2, "spatial_shapes must be (L, 2)");
    TORCH_CHECK(spatial_shapes_in.size(0) == sampling_locations_in.size(3) &&
                    level_start_index_in.size(0) == spatial_shapes_in.size(0),
                "spatial_shapes, level_start_index and sampling_locations disagree on the number of levels");
    TORCH_CHECK_VALUE(sampling_locations_in.size(0) == value_in.size(0) && sampling_locations_in.size(2) == value_in.size(2),
                      "ms_deform_attn_cpu: sampling_locations must have value's images (N) and heads (M)");
    TORCH_CHECK_VALUE(attention_weights_in.sizes() == sampling_locations_in.sizes().slice(0, 5),
                      "ms_deform_attn_cpu: attention_weights must be sampling_locations' (N, Lq, M, L, P)");
    const auto dtype = value_in.scalar_type();
    TORCH_CHECK(attention_weights_in.scalar_type() == dtype &&
                    (sampling_locations_in.scalar_type() == dtype ||
                     (is_reduced_precision(dtype) && sampling_locations_in.scalar_type() == at::kFloat)),
                "value and attention_weights must share one dtype, and sampling_locations too or be float32 "
                "beside bfloat16 or float16");
    TORCH_CHECK(value_in.size(1) < (int64_t(1) << 31), "ms_deform_attn_cpu: at most 2^31 - 1 positions");
    value = value_in.contiguous();
    spatial_shapes = spatial_shapes_in.to(at::kLong).contiguous();
    level_start_index = level_start_index_in.to(at::kLong).contiguous();
    sampling_locations = sampling_locations_in.contiguous();
    attention_weights = attention_weights_in.contiguous();
    batch = value.size(0), num_values = value.size(1), heads = value.size(2), channels = value.size(3);
    queries = sampling_locations.size(1), levels = sampling_locations.size(3), points = sampling_locations.size(4);
    check_levels_fit();
  }

  // The kernels index value with the levels unchecked, so a level that does not fit in value's
  // positions would read and write outside it. Only bounds are checked here, for any caller of the
  // op; ms_deform_attn checks that the levels describe value exactly before it dispatches.
  void check_levels_fit() const {
    const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
    const int64_t* starts = level_start_index.data_ptr<int64_t>();
    for (int64_t level = 0; level < levels; ++level) {
      const int64_t height = shapes[2 * level], width = shapes[2 * level + 1], start = starts[level];
      // Each size is bounded before the product, and the product before the sum, so none overflows.
      const bool fits = height >= 0 && width >= 0 && height <= num_values && width <= num_values &&
                        start >= 0 && start <= num_values - height * width;
      TORCH_CHECK_VALUE(fits, "ms_deform_attn_cpu: level ", level, " of ", height, "x", width, " from position ", start,
                        " does not fit in value's ", num_values, " positions");
    }
  }

  SampleLevels sample_levels() const {
    return SampleLevels(spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(), levels, points);
  }
};

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Inputs in(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  auto output = new_tensor({in.batch, in.queries, in.heads * in.channels}, in.value.options());
  if (output.numel() == 0) return output;
  if (in.levels * in.points == 0) return output.zero_();
  const auto sample_levels = in.sample_levels();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    dispatch_locations<scalar_t>(in.sampling_locations.scalar_type(), [&](auto location) {
      using location_t = decltype(location);
      dispatch_channels(in.channels, [&](auto fixed) {
        Kernels<scalar_t, location_t, decltype(fixed)::value>::forward(
            in.value.data_ptr<scalar_t>(), sample_levels, in.sampling_locations.data_ptr<location_t>(),
            in.attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), in.batch, in.num_values, in.heads,
            in.channels, in.queries, in.levels * in.points);
      });
    });
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& grad_output_in, const at::Tensor& value,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights) {
  const Inputs in(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK_VALUE(grad_output_in.sizes() == at::IntArrayRef({in.batch, in.queries, in.heads * in.channels}),
                    "ms_deform_attn_cpu_backward: grad_output must be the output's (N, Lq, M * D), got ",
                    grad_output_in.sizes());
  const auto grad_output = grad_output_in.contiguous();
  const auto dtype = in.value.scalar_type();
  // Low-precision gradients of value accumulate in float, then round once.
  const auto accumulation = is_reduced_precision(dtype) ? at::kFloat : dtype;
  // Heads are copied (see copy_head) where their samples outnumber their positions, as in the
  // encoder; the decoder's 300 queries accumulate into a zeroed gradient in place.
  const bool head_copies = in.queries * in.levels * in.points >= in.num_values;
  auto grad_value = head_copies ? new_tensor(in.value.sizes(), in.value.options())
                                : new_tensor(in.value.sizes(), in.value.options().dtype(accumulation)).zero_();
  auto grad_locations = new_tensor(in.sampling_locations.sizes(), in.sampling_locations.options());
  auto grad_weights = new_tensor(in.attention_weights.sizes(), in.attention_weights.options());
  if (grad_output.numel() == 0 || in.levels * in.points == 0) {
    return {grad_value.zero_().to(dtype), grad_locations.zero_(), grad_weights.zero_()};
  }
  const auto sample_levels = in.sample_levels();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ms_deform_attn_cpu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_locations<scalar_t>(in.sampling_locations.scalar_type(), [&](auto location) {
      using location_t = decltype(location);
      dispatch_channels(in.channels, [&](auto fixed) {
        Kernels<scalar_t, location_t, decltype(fixed)::value>::backward(
            grad_output.data_ptr<scalar_t>(), in.value.data_ptr<scalar_t>(), sample_levels,
            in.sampling_locations.data_ptr<location_t>(), in.attention_weights.data_ptr<scalar_t>(),
            head_copies ? nullptr : grad_value.data_ptr<acc_t>(), head_copies ? grad_value.data_ptr<scalar_t>() : nullptr,
            grad_locations.data_ptr<location_t>(), grad_weights.data_ptr<scalar_t>(), in.batch, in.num_values, in.heads,
            in.channels, in.queries, in.levels * in.points, head_copies);
      });
    });
  });
  return {grad_value.to(dtype), grad_locations, grad_weights};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ms_deform_attn_cpu_forward, "multi-scale deformable attention, CPU forward");
  m.def("backward", &ms_deform_attn_cpu_backward, "multi-scale deformable attention, CPU backward");
}
