// minibatch_stddev on CPU. Maths and checks in csrc/minibatch_stddev.h.
// NCHW: a task owns one (column m, channel) row of P pixels, vectorised along the pixels: it reads the
// G samples of the column, accumulates sqrt(var + eps) and writes the G rows of out as it goes.
// Channels-last: a task owns a range of pixels of one column, vectorised along the channels.
// The per-task sums are reduced in double; the F statistic channels are filled afterwards (N F H W values).
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/vec.h"
#include "dispatch.h"
#include "minibatch_stddev.h"

namespace genkern::cpu {
namespace {

constexpr int kMaxGroup = 64;  // larger groups take the scalar path

template <typename T>
double forward_nchw_row(const T* x, T* out, const MbstdShape& s, int64_t m, int64_t ch, float eps) {
  // row (g M + m, ch) of x starts at ((g M + m) C + ch) P; of out at ((g M + m)(C + F) + ch) P
  const int64_t P = s.P, G = s.G;
  using IO = VecIO<T>;
  Vec acc(0.0f);
  float acc_s = 0.0f;
  int64_t p = 0;
  Vec va[2 * kMaxGroup];
  if (G <= kMaxGroup) {
    for (; p + IO::kStep <= P; p += IO::kStep) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = g * s.M + m;
        IO::load(x + (i * s.C + ch) * P + p, va[2 * g], va[2 * g + 1]);
        IO::store(out + (i * (s.C + s.F) + ch) * P + p, va[2 * g], va[2 * g + 1]);
      }
      for (int half = 0; half < 2; ++half) {
        Vec sum(0.0f), var(0.0f);
        for (int64_t g = 0; g < G; ++g) sum = sum + va[2 * g + half];
        const Vec mu = sum * Vec(1.0f / G);
        for (int64_t g = 0; g < G; ++g) {
          const Vec d = va[2 * g + half] - mu;
          var = var + d * d;
        }
        acc = acc + (var * Vec(1.0f / G) + Vec(eps)).sqrt();
      }
    }
  }
  for (; p < P; ++p) {
    float sum = 0.0f, var = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = g * s.M + m;
      const T v = x[(i * s.C + ch) * P + p];
      out[(i * (s.C + s.F) + ch) * P + p] = v;
      sum += static_cast<float>(v);
    }
    const float mu = sum / G;
    for (int64_t g = 0; g < G; ++g) {
      const float d = static_cast<float>(x[((g * s.M + m) * s.C + ch) * P + p]) - mu;
      var += d * d;
    }
    acc_s += std::sqrt(var / G + eps);
  }
  return static_cast<double>(hsum(acc)) + acc_s;
}

// Channels-last: pixels [p0, p1) of column m; sums[ch] += sqrt(var + eps) per channel.
template <typename T>
void forward_cl_pixels(const T* x, T* out, const MbstdShape& s, int64_t m, int64_t p0, int64_t p1, float eps,
                       float* sums) {
  const int64_t C = s.C, G = s.G, CF = s.C + s.F;
  using IO = VecIO<T>;
  Vec va[2 * kMaxGroup];
  for (int64_t p = p0; p < p1; ++p) {
    int64_t ch = 0;
    if (G <= kMaxGroup) {
      for (; ch + IO::kStep <= C; ch += IO::kStep) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t i = g * s.M + m;
          IO::load(x + (i * s.P + p) * C + ch, va[2 * g], va[2 * g + 1]);
          IO::store(out + (i * s.P + p) * CF + ch, va[2 * g], va[2 * g + 1]);
        }
        for (int half = 0; half < 2; ++half) {
          Vec sum(0.0f), var(0.0f);
          for (int64_t g = 0; g < G; ++g) sum = sum + va[2 * g + half];
          const Vec mu = sum * Vec(1.0f / G);
          for (int64_t g = 0; g < G; ++g) {
            const Vec d = va[2 * g + half] - mu;
            var = var + d * d;
          }
          float* dst = sums + ch + half * kVec;
          (Vec::loadu(dst) + (var * Vec(1.0f / G) + Vec(eps)).sqrt()).store(dst);
        }
      }
    }
    for (; ch < C; ++ch) {
      float sum = 0.0f, var = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = g * s.M + m;
        const T v = x[(i * s.P + p) * C + ch];
        out[(i * s.P + p) * CF + ch] = v;
        sum += static_cast<float>(v);
      }
      const float mu = sum / G;
      for (int64_t g = 0; g < G; ++g) {
        const float d = static_cast<float>(x[((g * s.M + m) * s.P + p) * C + ch]) - mu;
        var += d * d;
      }
      sums[ch] += std::sqrt(var / G + eps);
    }
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
      std::vector<double> rows(s.M * s.C);
      at::parallel_for(0, s.M * s.C, std::max<int64_t>(1, 16384 / (s.P * s.G)), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) rows[t] = forward_nchw_row(px, po, s, t / s.C, t % s.C, e);
      });
      for (int64_t t = 0; t < s.M * s.C; ++t) stat_sum[(t / s.C) * s.F + (t % s.C) / s.c] += rows[t];
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
        for (int64_t ch = 0; ch < s.C; ++ch) stat_sum[(t / chunks) * s.F + ch / s.c] += sums[t * s.C + ch];
    }
  });
  auto stat = at::empty({s.M, s.F}, x.options().dtype(at::kFloat).device(at::kCPU));
  for (int64_t k = 0; k < s.M * s.F; ++k)
    stat.data_ptr<float>()[k] = static_cast<float>(stat_sum[k] / static_cast<double>(s.c * s.P));
  mbstd_fill_stats(out, stat, s);
  return out;
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
    const int64_t CF = s.C + s.F, G = s.G;
    // element (i, ch, p) at x offset xo(i, ch, p), dout offset go(i, ch, p), per layout
    auto xo = [&](int64_t i, int64_t ch, int64_t p) {
      return s.channels_last ? (i * s.P + p) * s.C + ch : (i * s.C + ch) * s.P + p;
    };
    auto gof = [&](int64_t i, int64_t ch, int64_t p) {
      return s.channels_last ? (i * s.P + p) * CF + ch : (i * CF + ch) * s.P + p;
    };
    // one task = one (m, ch) for NCHW (pixels contiguous) or one (m, p) for channels-last (channels
    // contiguous); the inner index runs along memory, scalar code the compiler vectorises
    const int64_t outer = s.channels_last ? s.P : s.C, inner = s.channels_last ? s.C : s.P;
    at::parallel_for(0, s.M * outer, std::max<int64_t>(1, 8192 / (inner * G)), [&](int64_t t0, int64_t t1) {
      std::vector<float> mu(inner), rs(inner);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t / outer, o = t % outer;
        auto at_ = [&](int64_t j, int64_t& ch, int64_t& p) {
          ch = s.channels_last ? j : o;
          p = s.channels_last ? o : j;
        };
        std::fill(mu.begin(), mu.end(), 0.0f);
        std::fill(rs.begin(), rs.end(), 0.0f);
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* row = px + xo(g * s.M + m, s.channels_last ? 0 : o, s.channels_last ? o : 0);
          for (int64_t j = 0; j < inner; ++j) mu[j] += static_cast<float>(row[j]);
        }
        for (int64_t j = 0; j < inner; ++j) mu[j] /= G;
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* row = px + xo(g * s.M + m, s.channels_last ? 0 : o, s.channels_last ? o : 0);
          for (int64_t j = 0; j < inner; ++j) {
            const float d = static_cast<float>(row[j]) - mu[j];
            rs[j] += d * d;
          }
        }
        for (int64_t j = 0; j < inner; ++j) {
          int64_t ch, p;
          at_(j, ch, p);
          rs[j] = pk[m * s.F + ch / s.c] / std::sqrt(rs[j] / G + e);  // k / s
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t i = g * s.M + m;
          const scalar_t* row = px + xo(i, s.channels_last ? 0 : o, s.channels_last ? o : 0);
          const scalar_t* grow = pg + gof(i, s.channels_last ? 0 : o, s.channels_last ? o : 0);
          scalar_t* drow = pd + xo(i, s.channels_last ? 0 : o, s.channels_last ? o : 0);
          for (int64_t j = 0; j < inner; ++j)
            drow[j] = static_cast<scalar_t>(static_cast<float>(grow[j]) + rs[j] * (static_cast<float>(row[j]) - mu[j]));
        }
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
