// pixel_norm on CPU. Maths and checks in csrc/pixel_norm.h.
// NCHW: a task owns kChunk positions of one sample and walks the channels twice (sum of squares,
// then scale), vectorised along the positions; the chunk's rows stay in L1/L2 between the walks.
// The first walk reads from memory row by row; on maps of 32x32 and more each row starts a 4 KB
// page of its own, where the L2's hardware streamer starts over, so it prefetches kRowsAhead rows
// ahead (on smaller maps, where the streamer runs on from row to row, measured no slower). The
// second walk takes the rows in reverse, the last read first: a chunk (at 512 channels 2 MB of x, or
// 4 MB of x and dy) fills or overflows a 2 MB L2, which still holds the rows read last.
// 16x512x32x32, 2 threads, the variants interleaved in shuffled order: forward 1.78-1.81 -> 1.64-1.66
// ms, backward 2.95-3.17 -> 2.57-2.72 ms (the reversal most of either gain).
// Channels-last and [N, C] latents: a task owns whole rows of C contiguous channels.
#include <cstdint>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/parallel.h"
#include "cpu/vec.h"
#include "dispatch.h"
#include "pixel_norm.h"

namespace genkern::cpu {
namespace {

constexpr int64_t kChunk = 1024;
constexpr int64_t kRowsAhead = 4;
// The last L % kStep positions of a chunk take one padded vector step (vec.h: load_padded), which
// reads and writes the per-position buffers up to the next multiple of kStep: they hold kChunk, a
// multiple of it, and are zero beyond L. A scalar walk instead made 4x4 maps (16 positions, all
// tail with AVX-512's 32-value steps) a scalar kernel.
static_assert(kChunk % (2 * kVec) == 0, "pad_to_step");

// Small maps (P <= S * kStep positions, ProGAN's 4x4 and 8x8 layers): the whole chunk's sums live in
// 2 * S registers, so each channel row costs loads and FMAs only; the general loop below reloads and
// stores its float accumulators for every row, which bounds it by the store port. When P is not a
// multiple of kStep (4x4 maps with AVX-512's 32-value steps) the last step of a row is padded with
// zeros, which add nothing to the sums (64x512x4x4 forward, 2 threads: 0.095 -> 0.081 ms; the AVX2
// build, whose 16-value steps fit the rows: 0.062).
template <int S, typename T>
void forward_tile(const T* x, T* y, float* rstd, int64_t C, int64_t P, float eps, bool stream) {
  using IO = VecIO<T>;
  const int64_t last = P - (S - 1) * IO::kStep;  // values in a row's last step, 1 .. kStep
  auto load = [&](const T* row, int k, Vec& a, Vec& b) {
    if (k == S - 1 && last < IO::kStep)
      load_padded(row + k * IO::kStep, last, a, b);
    else
      IO::load(row + k * IO::kStep, a, b);
  };
  Vec acc[2 * S];
  for (auto& a : acc) a = Vec(0.0f);
  for (int64_t c = 0; c < C; ++c) {
    for (int k = 0; k < S; ++k) {
      Vec a, b;
      load(x + c * P, k, a, b);
      acc[2 * k] = at::vec::fmadd(a, a, acc[2 * k]);
      acc[2 * k + 1] = at::vec::fmadd(b, b, acc[2 * k + 1]);
    }
  }
  const Vec inv_c(1.0f / static_cast<float>(C)), ve(eps), one(1.0f);
  for (int k = 0; k < 2 * S; ++k) {
    acc[k] = one / (acc[k] * inv_c + ve).sqrt();
    if (k * kVec < P) acc[k].store(rstd + k * kVec, std::min(kVec, P - k * kVec));
  }
  for (int64_t c = 0; c < C; ++c) {
    T* out = y + c * P;
    for (int k = 0; k < S; ++k) {
      Vec a, b;
      load(x + c * P, k, a, b);
      if (k == S - 1 && last < IO::kStep)
        store_first(out + k * IO::kStep, last, a * acc[2 * k], b * acc[2 * k + 1]);
      else
        store_out(out + k * IO::kStep, a * acc[2 * k], b * acc[2 * k + 1], stream);
    }
  }
}

template <typename T>
void forward_chunk(const T* x, T* y, float* rstd, int64_t C, int64_t P, int64_t p0, int64_t L, float eps,
                   bool stream) {
  using IO = VecIO<T>;
  if (p0 == 0 && L == P && P % kVec == 0 && P <= 4 * IO::kStep) {
    switch ((P + IO::kStep - 1) / IO::kStep) {
      case 1: return forward_tile<1>(x, y, rstd, C, P, eps, stream);
      case 2: return forward_tile<2>(x, y, rstd, C, P, eps, stream);
      case 3: return forward_tile<3>(x, y, rstd, C, P, eps, stream);
      case 4: return forward_tile<4>(x, y, rstd, C, P, eps, stream);
    }
  }
  alignas(64) float acc[kChunk] = {};
  for (int64_t c = 0; c < C; ++c) {
    const T* row = x + c * P + p0;
    const bool ahead = c + kRowsAhead < C;
    for_each_step<T>(L, stream, [&](int64_t i, auto load, auto) {  // padded step: zeros add nothing
      if (ahead) prefetch_l2(row + kRowsAhead * P + i);
      Vec a, b;
      load(row + i, a, b);
      (Vec::loadu(acc + i) + a * a).store(acc + i);
      (Vec::loadu(acc + i + kVec) + b * b).store(acc + i + kVec);
    });
  }
  for (int64_t i = 0; i < L; ++i) acc[i] = rstd[p0 + i] = 1.0f / std::sqrt(acc[i] / static_cast<float>(C) + eps);
  for (int64_t c = C - 1; c >= 0; --c) {
    const T* row = x + c * P + p0;
    T* out = y + c * P + p0;
    for_each_step<T>(L, stream, [&](int64_t i, auto load, auto store) {
      Vec a, b;
      load(row + i, a, b);
      store(out + i, a * Vec::loadu(acc + i), b * Vec::loadu(acc + i + kVec));
    });
  }
}

template <typename T>
void backward_chunk(const T* dy, const T* x, const float* rstd, T* dx, int64_t C, int64_t P, int64_t p0,
                    int64_t L, bool stream) {
  alignas(64) float dot[kChunk] = {};
  for (int64_t c = 0; c < C; ++c) {
    const T *g = dy + c * P + p0, *v = x + c * P + p0;
    const bool ahead = c + kRowsAhead < C;
    for_each_step<T>(L, stream, [&](int64_t i, auto load, auto) {
      if (ahead) {
        prefetch_l2(g + kRowsAhead * P + i);
        prefetch_l2(v + kRowsAhead * P + i);
      }
      Vec ga, gb, va, vb;
      load(g + i, ga, gb);
      load(v + i, va, vb);
      (Vec::loadu(dot + i) + ga * va).store(dot + i);
      (Vec::loadu(dot + i + kVec) + gb * vb).store(dot + i + kVec);
    });
  }
  alignas(64) float r[kChunk], k[kChunk];
  for (int64_t i = 0; i < L; ++i) {
    r[i] = rstd[p0 + i];
    k[i] = r[i] * r[i] * r[i] * dot[i] / static_cast<float>(C);  // dx = r dy - k x
  }
  for (int64_t i = L; i < std::min(kChunk, (L + 2 * kVec - 1) / (2 * kVec) * (2 * kVec)); ++i) r[i] = k[i] = 0.f;
  for (int64_t c = C - 1; c >= 0; --c) {
    const T *g = dy + c * P + p0, *v = x + c * P + p0;
    T* out = dx + c * P + p0;
    for_each_step<T>(L, stream, [&](int64_t i, auto load, auto store) {
      Vec ga, gb, va, vb;
      load(g + i, ga, gb);
      load(v + i, va, vb);
      store(out + i, Vec::loadu(r + i) * ga - Vec::loadu(k + i) * va,
            Vec::loadu(r + i + kVec) * gb - Vec::loadu(k + i + kVec) * vb);
    });
  }
}

// sum over a contiguous row of f(a_i, b_i) for the two row loaders, vectorised with two accumulators
template <typename T, typename F>
float row_sum(const T* a, const T* b, int64_t C, F f) {
  using IO = VecIO<T>;
  Vec s0(0.0f), s1(0.0f);
  int64_t c = 0;
  for (; c + IO::kStep <= C; c += IO::kStep) {
    Vec a0, a1, b0, b1;
    IO::load(a + c, a0, a1);
    IO::load(b + c, b0, b1);
    s0 = s0 + f(a0, b0);
    s1 = s1 + f(a1, b1);
  }
  float s = hsum(s0 + s1);
  for (; c < C; ++c) s += f(static_cast<float>(a[c]), static_cast<float>(b[c]));
  return s;
}

template <typename T>
void forward_row(const T* x, T* y, float* rstd, int64_t C, float eps, bool stream) {
  using IO = VecIO<T>;
  const float r = 1.0f / std::sqrt(row_sum(x, x, C, [](auto u, auto) { return u * u; }) / C + eps);
  *rstd = r;
  const Vec vr(r);
  int64_t c = 0;
  for (; c + IO::kStep <= C; c += IO::kStep) {
    Vec a, b;
    IO::load(x + c, a, b);
    store_out(y + c, a * vr, b * vr, stream);
  }
  for (; c < C; ++c) y[c] = static_cast<T>(static_cast<float>(x[c]) * r);
}

template <typename T>
void backward_row(const T* dy, const T* x, float r, T* dx, int64_t C, bool stream) {
  using IO = VecIO<T>;
  const float k = r * r * r * row_sum(dy, x, C, [](auto g, auto v) { return g * v; }) / C;
  const Vec vr(r), vk(k);
  int64_t c = 0;
  for (; c + IO::kStep <= C; c += IO::kStep) {
    Vec ga, gb, va, vb;
    IO::load(dy + c, ga, gb);
    IO::load(x + c, va, vb);
    store_out(dx + c, vr * ga - vk * va, vr * gb - vk * vb, stream);
  }
  for (; c < C; ++c) dx[c] = static_cast<T>(r * static_cast<float>(dy[c]) - k * static_cast<float>(x[c]));
}

bool by_rows(const PixelNormShape& s) { return s.channels_last || s.P == 1; }

// The two ways the forward and the backward cut the work. Channels-last and latents: f(r0, r1) over
// ranges of rows (pixels) of C values, at least 16K values per task.
template <typename F>
void for_each_row_range(const PixelNormShape& s, const F& f) {
  at::parallel_for(0, s.N * s.P, std::max<int64_t>(1, 16384 / s.C), f);
}
// NCHW: f(n, p0, L) for chunks of L <= kChunk positions of sample n, handed out through a shared
// counter (parallel.h), not split statically (64x512x8x8 forward 0.80 -> 0.68 ms); a chunk reads C
// rows of L positions.
template <typename F>
void for_each_chunk(const PixelNormShape& s, int64_t element_size, const F& f) {
  const int64_t chunks = (s.P + kChunk - 1) / kChunk;
  const int64_t min_per_thread = std::max<int64_t>(1, 16384 / (s.C * kChunk));
  parallel_blocks(s.N * chunks, min_per_thread, s.C * std::min(kChunk, s.P) * element_size, [&](int64_t t) {
    const int64_t n = t / chunks, p0 = (t % chunks) * kChunk;
    f(n, p0, std::min(kChunk, s.P - p0));
  });
}

std::tuple<at::Tensor, at::Tensor> pixel_norm(const at::Tensor& x_in, double eps) {
  const PixelNormForwardCall call = prepare_pixel_norm_forward(x_in, eps);
  const at::Tensor &x = call.x, &y = call.y, &rstd = call.rstd;
  const PixelNormShape& s = call.s;
  if (x.numel() == 0) return {y, rstd};
  const float e = static_cast<float>(eps);
  const bool stream = stream_outputs(2 * x.numel() * x.element_size());
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "pixel_norm_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    float* pr = rstd.mutable_data_ptr<float>();
    if (by_rows(s)) {
      for_each_row_range(s, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) forward_row(px + r * s.C, py + r * s.C, pr + r, s.C, e, stream);
        stream_fence();
      });
    } else {
      for_each_chunk(s, x.element_size(), [&](int64_t n, int64_t p0, int64_t L) {
        const int64_t o = n * s.C * s.P;
        forward_chunk(px + o, py + o, pr + n * s.P, s.C, s.P, p0, L, e, stream);
        if (stream) stream_fence();
      });
    }
  });
  return {y, rstd};
}

at::Tensor pixel_norm_backward(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& rstd_in) {
  auto call = prepare_pixel_norm_backward(grad_y, x_in, rstd_in);
  const auto &x = call.x, &dy = call.dy, &rstd = call.rstd;
  const auto& s = call.s;
  auto& dx = call.dx;
  if (x.numel() == 0) return dx;
  const bool stream = stream_outputs(3 * x.numel() * x.element_size());
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "pixel_norm_backward_cpu", [&] {
    const scalar_t *pg = dy.const_data_ptr<scalar_t>(), *px = x.const_data_ptr<scalar_t>();
    scalar_t* pd = dx.mutable_data_ptr<scalar_t>();
    const float* pr = rstd.const_data_ptr<float>();
    if (by_rows(s)) {
      for_each_row_range(s, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          backward_row(pg + r * s.C, px + r * s.C, pr[r], pd + r * s.C, s.C, stream);
        stream_fence();
      });
    } else {
      for_each_chunk(s, x.element_size(), [&](int64_t n, int64_t p0, int64_t L) {
        const int64_t o = n * s.C * s.P;
        backward_chunk(pg + o, px + o, pr + n * s.P, pd + o, s.C, s.P, p0, L, stream);
        if (stream) stream_fence();
      });
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("pixel_norm", &pixel_norm);
  m.impl("pixel_norm_backward", &pixel_norm_backward);
}

}  // namespace genkern::cpu
