// minibatch_stddev on CPU. Maths and checks in csrc/minibatch_stddev.h.
// NCHW: a task owns a run of one statistic slice (c channels of P pixels, contiguous in each sample) of
// column m, vectorised along it: it reads the G samples of the column, accumulates sqrt(var + eps)
// and writes the G rows of out as it goes (the backward cuts the same runs).
// Channels-last: a task owns a range of pixels of one column, vectorised along the channels.
// The per-task sums are reduced in double; the F statistic channels are filled afterwards (N F H W values).
#include <algorithm>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/vec.h"
#include "dispatch.h"
#include "minibatch_stddev.h"

namespace genkern::cpu {
namespace {

// One position of the group's G samples at x_at(g): their mean and sqrt(var + eps) from two walks,
// the second from L1, for 2 kVec lanes (group_stats) or one element (group_stats_one). on_load(g, ...)
// sees each sample's values on the first walk: the forward copies them into out there.
struct GroupStats {
  Vec mean[2], sd[2];
};

// load(g, a, b) gives sample g's 2 kVec values (IO::load, or load_padded for the last ones of a row).
template <typename Load, typename OnLoad>
inline GroupStats group_stats(const Load& load, int64_t G, float eps, const OnLoad& on_load) {
  Vec s0(0.0f), s1(0.0f);
  for (int64_t g = 0; g < G; ++g) {
    Vec a, b;
    load(g, a, b);
    on_load(g, a, b);
    s0 = s0 + a;
    s1 = s1 + b;
  }
  const Vec inv(1.0f / G), m0 = s0 * inv, m1 = s1 * inv;
  Vec v0(0.0f), v1(0.0f);
  for (int64_t g = 0; g < G; ++g) {
    Vec a, b;
    load(g, a, b);
    v0 = v0 + (a - m0) * (a - m0);
    v1 = v1 + (b - m1) * (b - m1);
  }
  return {{m0, m1}, {(v0 * inv + Vec(eps)).sqrt(), (v1 * inv + Vec(eps)).sqrt()}};
}

template <typename T, typename XAt, typename OnLoad>
inline std::pair<float, float> group_stats_one(const XAt& x_at, int64_t G, float eps, const OnLoad& on_load) {
  float sum = 0.0f, var = 0.0f;
  for (int64_t g = 0; g < G; ++g) {
    on_load(g, *x_at(g));
    sum += static_cast<float>(*x_at(g));
  }
  const float mu = sum / G;
  for (int64_t g = 0; g < G; ++g) {
    const float d = static_cast<float>(*x_at(g)) - mu;
    var += d * d;
  }
  return {mu, std::sqrt(var / G + eps)};
}

// The forward's walk: group_stats that copies x into out (at o_at(g)) on the way; returns the std.
template <typename T, typename XAt, typename OAt>
inline std::pair<Vec, Vec> group_std(const XAt& x_at, const OAt& o_at, int64_t G, float eps) {
  const GroupStats st = group_stats([&](int64_t g, Vec& a, Vec& b) { VecIO<T>::load(x_at(g), a, b); }, G, eps,
                                    [&](int64_t g, const Vec& a, const Vec& b) { VecIO<T>::store(o_at(g), a, b); });
  return {st.sd[0], st.sd[1]};
}

template <typename T, typename XAt, typename OAt>
inline float group_std_one(const XAt& x_at, const OAt& o_at, int64_t G, float eps) {
  return group_stats_one<T>(x_at, G, eps, [&](int64_t g, T v) { *o_at(g) = v; }).second;
}

// NCHW: a run of positions j in [j0, j1) of slice f (channel f c + j / P, pixel j % P: contiguous in
// every sample) for column m; returns the sum of sqrt(var + eps) over the run.
template <typename T>
double forward_nchw_run(const T* x, T* out, const MbstdShape& s, int64_t m, int64_t f, int64_t j0, int64_t j1,
                        float eps) {
  const int64_t slab = f * s.c * s.P;
  int64_t j = j0;
  auto x_at = [&](int64_t g) { return x + (g * s.M + m) * s.C * s.P + slab + j; };
  auto o_at = [&](int64_t g) { return out + (g * s.M + m) * (s.C + s.F) * s.P + slab + j; };
  Vec acc(0.0f);
  double acc_s = 0.0;
  for (; j + VecIO<T>::kStep <= j1; j += VecIO<T>::kStep) {
    const auto [r0, r1] = group_std<T>(x_at, o_at, s.G, eps);
    acc = acc + r0 + r1;
  }
  for (; j < j1; ++j) acc_s += group_std_one<T>(x_at, o_at, s.G, eps);
  return static_cast<double>(hsum(acc)) + acc_s;
}

// Channels-last: pixels [p0, p1) of column m; sums[ch] += sqrt(var + eps) per channel.
template <typename T>
void forward_cl_pixels(const T* x, T* out, const MbstdShape& s, int64_t m, int64_t p0, int64_t p1, float eps,
                       float* sums) {
  const int64_t C = s.C, CF = s.C + s.F;
  for (int64_t p = p0; p < p1; ++p) {
    int64_t ch = 0;
    auto x_at = [&](int64_t g) { return x + ((g * s.M + m) * s.P + p) * C + ch; };
    auto o_at = [&](int64_t g) { return out + ((g * s.M + m) * s.P + p) * CF + ch; };
    for (; ch + VecIO<T>::kStep <= C; ch += VecIO<T>::kStep) {
      const auto [r0, r1] = group_std<T>(x_at, o_at, s.G, eps);
      (Vec::loadu(sums + ch) + r0).store(sums + ch);
      (Vec::loadu(sums + ch + kVec) + r1).store(sums + ch + kVec);
    }
    for (; ch < C; ++ch) sums[ch] += group_std_one<T>(x_at, o_at, s.G, eps);
  }
}

at::Tensor minibatch_stddev(const at::Tensor& x_in, int64_t group_size, int64_t num_channels, double eps) {
  auto s = mbstd_shape(x_in, group_size, num_channels, eps, "minibatch_stddev");
  const auto x = x_in.contiguous(mbstd_format(s));
  auto out = at::empty({s.N, s.C + s.F, x.size(2), x.size(3)}, x.options().memory_format(mbstd_format(s)));
  const float e = static_cast<float>(eps);
  std::vector<double> stat_sum(s.M * s.F, 0.0);
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "minibatch_stddev_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (!s.channels_last) {
      const int64_t run = std::max<int64_t>(256, 16384 / s.G), len = s.c * s.P;
      const int64_t chunks = (len + run - 1) / run;
      std::vector<double> part(s.M * s.F * chunks);
      at::parallel_for(0, s.M * s.F * chunks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t mf = t / chunks, j0 = (t % chunks) * run;
          part[t] = forward_nchw_run(px, po, s, mf / s.F, mf % s.F, j0, std::min(len, j0 + run), e);
        }
      });
      for (int64_t t = 0; t < s.M * s.F * chunks; ++t) stat_sum[t / chunks] += part[t];
    } else {
      const int64_t per_task = std::max<int64_t>(1, 16384 / (s.C * s.G));
      const int64_t chunks = (s.P + per_task - 1) / per_task;
      std::vector<float> sums(s.M * chunks * s.C, 0.0f);
      at::parallel_for(0, s.M * chunks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t m = t / chunks, p0 = (t % chunks) * per_task;
          forward_cl_pixels(px, po, s, m, p0, std::min(s.P, p0 + per_task), e, sums.data() + t * s.C);
        }
      });
      for (int64_t t = 0; t < s.M * chunks; ++t)
        for (int64_t f = 0; f < s.F; ++f)
          for (int64_t j = 0; j < s.c; ++j) stat_sum[(t / chunks) * s.F + f] += sums[(t * s.F + f) * s.c + j];
    }
  });
  // the F statistic channels: N F P values written here (ATen's repeat/expand/copy would cost more)
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "minibatch_stddev_cpu_fill", [&] {
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const int64_t CF = s.C + s.F;
    at::parallel_for(0, s.N * s.F, std::max<int64_t>(1, 16384 / s.P), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t / s.F, f = t % s.F;
        const auto v = static_cast<scalar_t>(stat_sum[(i % s.M) * s.F + f] / static_cast<double>(s.c * s.P));
        for (int64_t p = 0; p < s.P; ++p)
          po[s.channels_last ? (i * s.P + p) * CF + s.C + f : (i * CF + s.C + f) * s.P + p] = v;
      }
    });
  });
  return out;
}

// Backward over one row of n elements contiguous in each of the G samples of a group (x_at(g),
// dout_at(g), dx_at(g)): per 2 kVec lanes, the group's mean and std (group_stats, as the forward),
// then dx_g = dout_g + k (x_g - mean) / std, k the statistic channel's
// gradient scale (csrc/minibatch_stddev.h). All G samples of a lane are in flight at once, as in the
// forward; a walk per sample over the whole row ran at a third of copy speed.
template <typename T, typename XAt, typename GAt, typename DAt, typename K>
void grad_row(const XAt& x_at, const GAt& dout_at, const DAt& dx_at, int64_t n, int64_t G, K k, float eps) {
  auto none = [](int64_t, auto&&...) {};
  // the last values of a row take one padded step (vec.h: for_each_step); a scalar walk per value ran
  // the backward at half speed. The step is always inlined, as its loop body was before.
  for_each_step<T>(n, false, [&](int64_t j, auto load, auto store) C10_ALWAYS_INLINE_ATTRIBUTE {
    const GroupStats st = group_stats([&](int64_t g, Vec& a, Vec& b) { load(x_at(g) + j, a, b); }, G, eps, none);
    Vec k0, k1;
    load.param(k, j, k0, k1);
    const Vec r0 = k0 / st.sd[0], r1 = k1 / st.sd[1];
    for (int64_t g = 0; g < G; ++g) {
      Vec a, b, d0, d1;
      load(x_at(g) + j, a, b);
      load(dout_at(g) + j, d0, d1);
      store(dx_at(g) + j, at::vec::fmadd(r0, a - st.mean[0], d0), at::vec::fmadd(r1, b - st.mean[1], d1));
    }
  });
}

at::Tensor minibatch_stddev_backward(const at::Tensor& grad_out, const at::Tensor& x_in, int64_t group_size,
                                     int64_t num_channels, double eps) {
  auto s = mbstd_shape(x_in, group_size, num_channels, eps, "minibatch_stddev_backward");
  check_mbstd_grad(grad_out, x_in, s);
  const auto x = x_in.contiguous(mbstd_format(s));
  const auto go = grad_out.contiguous(mbstd_format(s));
  auto dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const auto coef = mbstd_grad_coef(go, s);  // [M, F]
  const float e = static_cast<float>(eps);
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "minibatch_stddev_backward_cpu", [&] {
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pg = go.const_data_ptr<scalar_t>();
    scalar_t* pd = dx.mutable_data_ptr<scalar_t>();
    const float* pk = coef.const_data_ptr<float>();
    const int64_t CF = s.C + s.F;
    if (!s.channels_last) {
      // NCHW: the c channels of one statistic slice f are one contiguous run of c P values in every
      // sample (x, dout and dx alike), cut into chunks as the forward cuts them; grad_row walks a chunk
      // as one row, its lanes spanning channel boundaries (lanes are independent). One task per
      // (m, channel) row instead made 4x4 maps (16 values) one padded half-empty AVX-512 step per row
      // (32x512x4x4 forward+backward, 2 threads, median of 6 alternating runs: 0.33 -> 0.28 ms).
      const int64_t run = std::max<int64_t>(256, 16384 / s.G), len = s.c * s.P;
      const int64_t chunks = (len + run - 1) / run;
      at::parallel_for(0, s.M * s.F * chunks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t mf = t / chunks, m = mf / s.F, f = mf % s.F, j0 = (t % chunks) * run;
          auto x_at = [&](int64_t g) { return px + ((g * s.M + m) * s.C + f * s.c) * s.P + j0; };
          auto g_at = [&](int64_t g) { return pg + ((g * s.M + m) * CF + f * s.c) * s.P + j0; };
          auto d_at = [&](int64_t g) { return pd + ((g * s.M + m) * s.C + f * s.c) * s.P + j0; };
          grad_row<scalar_t>(x_at, g_at, d_at, std::min(len, j0 + run) - j0, s.G, Broadcast{pk[mf]}, e);
        }
      });
      return;
    }
    // channels-last: one task = one (m, p) row of C channels, walked along memory by grad_row
    at::parallel_for(0, s.M * s.P, std::max<int64_t>(1, 8192 / (s.C * s.G)), [&](int64_t t0, int64_t t1) {
      std::vector<float> k(s.C);
      int64_t k_of = -1;  // the column k holds: a task's rows mostly share one
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t / s.P, p = t % s.P;
        auto x_at = [&](int64_t g) { return px + ((g * s.M + m) * s.P + p) * s.C; };
        auto g_at = [&](int64_t g) { return pg + ((g * s.M + m) * s.P + p) * CF; };
        auto d_at = [&](int64_t g) { return pd + ((g * s.M + m) * s.P + p) * s.C; };
        if (m != k_of) {
          for (int64_t f = 0; f < s.F; ++f) std::fill_n(k.begin() + f * s.c, s.c, pk[m * s.F + f]);
          k_of = m;
        }
        grad_row<scalar_t>(x_at, g_at, d_at, s.C, s.G, PerLane{k.data()}, e);
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("minibatch_stddev", &minibatch_stddev);
  m.impl("minibatch_stddev_backward", &minibatch_stddev_backward);
}

}  // namespace genkern::cpu
