// group_norm_silu on the CPU: at::vec vectorised, at::parallel_for threaded. Maths in
// csrc/group_norm_silu.h. Work is cut into "tasks" that never straddle a (sample, group):
//  - NCHW: a group is D contiguous rows of HW; a task is one row (or a slice of it), or the whole
//    group when its rows are short (short_rows).
//  - channels-last: a sample is HW rows of C; a task is a block of pixel rows of one sample.
// When there are at least as many groups (NCHW) or samples (channels-last) as threads, each thread
// owns whole groups/samples and reads them a second time while they are still in its cache;
// otherwise the tasks of one group/sample are spread over the threads.
#include <algorithm>
#include <memory>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/parallel.h"
#include "cpu/vec.h"
#include "dispatch.h"
#include "group_norm_silu.h"

namespace genkern::cpu {
namespace {

constexpr int64_t kFlush = 4096;     // fp32 partial sums of a row cover at most this many elements
constexpr int64_t kFlushRows = 256;  // ... and of channels-last rows at most this many pixels
constexpr int64_t kMinTask = 4096;   // smallest slice worth a task of its own when splitting
constexpr int64_t kActPart = 256;    // values per chunk of the two-pass SiLU (silu_two_pass)

// ---------------------------------------------------------------------------------------------
// Inner loops over one contiguous row. P is Broadcast (NCHW) or PerLane (channels-last).

template <typename T>
inline std::pair<double, double> shifted_sums(const T* x, int64_t n, float pivot) {
  const Vec vp(pivot);
  double s1 = 0, s2 = 0;
  for (int64_t i = 0; i < n;) {
    const int64_t end = std::min(n, i + kFlush);
    // four independent accumulators of each sum: with two the loop waits on the FMA latency
    Vec acc1[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)}, acc2[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
    // x - pivot of one step into accumulators k and k + 1
    auto accumulate = [&](const Vec& va, const Vec& vb, int k) {
      acc1[k] = acc1[k] + va;
      acc2[k] = at::vec::fmadd(va, va, acc2[k]);
      acc1[k + 1] = acc1[k + 1] + vb;
      acc2[k + 1] = at::vec::fmadd(vb, vb, acc2[k + 1]);
    };
    auto add = [&](int64_t p, int k) {
      Vec va, vb;
      VecIO<T>::load(x + p, va, vb);
      accumulate(va - vp, vb - vp, k);
    };
    for (; i + 2 * VecIO<T>::kStep <= end; i += 2 * VecIO<T>::kStep) {
      add(i, 0);
      add(i + VecIO<T>::kStep, 2);
    }
    for (; i + VecIO<T>::kStep <= end; i += VecIO<T>::kStep) add(i, 0);
    if (const int64_t m = end - i; m > 0) {
      // the last values as one padded step, the padding lanes' -pivot zeroed (Vec::set takes the
      // first lanes from its second argument): a scalar tail's two dependent chains were ~30 cycles
      // of a 7x7 group's ~160-cycle statistics, which the group's SiLU then waits on
      Vec va, vb;
      load_padded(x + i, m, va, vb);
      accumulate(Vec::set(Vec(0.f), va - vp, std::min(m, kVec)),
                 Vec::set(Vec(0.f), vb - vp, std::max<int64_t>(0, m - kVec)), 2);
      i = end;
    }
    s1 += hsum((acc1[0] + acc1[1]) + (acc1[2] + acc1[3]));
    s2 += hsum((acc2[0] + acc2[1]) + (acc2[2] + acc2[3]));
  }
  return {s1, s2};
}

// acc1[c] += x[r][c] - pivot[c]; acc2[c] += (x[r][c] - pivot[c])^2 over `rows` channels-last rows
// of C values. Up to four rows per load and store of the accumulators (one row each made the
// statistics pass a third of the forward's time).
template <typename T>
inline void shifted_sums_lanes(const T* x, int64_t rows, int64_t C, const float* pivot, float* acc1, float* acc2) {
  constexpr int64_t kRows = 4;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t nr = std::min(kRows, rows - r0);
    const T* xr = x + r0 * C;
    int64_t c = 0;
    for (; c + VecIO<T>::kStep <= C; c += VecIO<T>::kStep) {
      const Vec pa = Vec::loadu(pivot + c), pb = Vec::loadu(pivot + c + kVec);
      Vec s1a = Vec::loadu(acc1 + c), s1b = Vec::loadu(acc1 + c + kVec);
      Vec s2a = Vec::loadu(acc2 + c), s2b = Vec::loadu(acc2 + c + kVec);
      for (int64_t r = 0; r < nr; ++r) {
        Vec va, vb;
        VecIO<T>::load(xr + r * C + c, va, vb);
        va = va - pa;
        vb = vb - pb;
        s1a = s1a + va;
        s1b = s1b + vb;
        s2a = at::vec::fmadd(va, va, s2a);
        s2b = at::vec::fmadd(vb, vb, s2b);
      }
      s1a.store(acc1 + c);
      s1b.store(acc1 + c + kVec);
      s2a.store(acc2 + c);
      s2b.store(acc2 + c + kVec);
    }
    for (; c < C; ++c)
      for (int64_t r = 0; r < nr; ++r) {
        const float v = static_cast<float>(xr[r * C + c]) - pivot[c];
        acc1[c] += v;
        acc2[c] += v * v;
      }
  }
}

// The affine map of a row: u = (x - mu) a + b, and t = -u log2(e) = (x - mu) a2 + b2 with a2, b2 the
// same times -log2(e), so that the argument of exp(-u) costs one FMA (vec.h: exp2_clamped). Only the
// backward reads a2, b2: the forward takes t from u, which it keeps (silu_two_pass).
// P: Broadcast (NCHW, one channel per row) or PerLane (channels-last, a row runs over the channels).
// NCHW short rows (ExpandedParams): mu Broadcast, a and a2 ScaledLane, b and b2 PerLane.
template <typename PM, typename PA = PM, typename PB = PA>
struct Affine {
  PM mu;
  PA a;
  PB b;
  PA a2;
  PB b2;
};
inline Affine<Broadcast> affine(float mu, float a, float b) {
  return {{mu}, {a}, {b}, {-a * kLog2e}, {-b * kLog2e}};
}
// Channels-last: the five per-channel arrays of one sample, each repeated `rows` times so that one
// call can cover that many consecutive pixel rows.
struct LaneAffine {
  int64_t C, L;
  std::vector<float> v;
  explicit LaneAffine(int64_t C, int64_t rows = 1) : C(C), L(C * rows), v(5 * L) {}
  void set(int64_t c, float mu, float a, float b) {
    for (int64_t i = c; i < L; i += C)
      v[i] = mu, v[L + i] = a, v[2 * L + i] = b, v[3 * L + i] = -a * kLog2e, v[4 * L + i] = -b * kLog2e;
  }
  Affine<PerLane> lanes() const {
    const float* p = v.data();
    return {{p}, {p + L}, {p + 2 * L}, {p + 3 * L}, {p + 4 * L}};
  }
};
// Lines a loop asks the cache for while it computes on its own. r0, r1: read next (the x and dy of the
// worker's next group, or channels-last sample, at the same offsets); w: written soon (the next
// group's y; in the backward, this group's dx, which its light second pass writes). A store that
// misses L1 waits for its line, and the stores of a light loop come in a burst that fills the store
// queue: prefetching them for writing took
// 16x256x16x16 forward 0.50 -> 0.48 ms and forward+backward 1.51-1.56 -> 1.45-1.47 ms (2 threads, each
// call right after an eager one, same-process A/B).
template <typename T>
struct Prefetch {
  const T *r0 = nullptr, *r1 = nullptr;
  T* w = nullptr;
  void at(int64_t i) const {
    if (r0) prefetch(r0 + i);
    if (r1) prefetch(r1 + i);
    if (w) prefetch_for_write(w + i);
  }
};

// SiLU over a row in two passes per kActPart values: v and e = exp(-u) into L1 buffers, then
// finish(k, v_a, v_b, e_a, e_b) for the 2 kVec values at k, where v is u = (x - mu) a + b itself when
// kKeepU (the forward: its second loop then loads no parameters and t = -u log2(e) is one multiply;
// the loops alone, one thread in L1, take 13% fewer cycles with channels-last's per-lane parameters
// and 4% fewer with NCHW's broadcast ones; the op, in-process A/B: channels-last 16x128x32x32 4-6%,
// NCHW 16x256x16x16 1.5% faster), else xc = x - mu (the backward, which needs xc as well).
// Two loops have 1.25x the throughput of one carrying the whole ~50-cycle chain per vector, which
// keeps too few vectors in flight (vec.h: exp2_clamped). The first loop is itself software-pipelined
// by one step: step j's loads and range reduction are issued beside step j - 1's polynomial, whose
// inputs are then ready instead of waiting in the scheduler (that loop alone 8.8 -> 7.6 cycles per
// 8 values).
// Covers whole kStep steps; returns where it stopped. Always inlined: called, it sees finish's
// captures as references that stores to y may alias and reloads parameters and pointers in every
// iteration (16x256x16x16 forward 0.45-0.47 -> 0.41-0.42 ms).
template <bool kKeepU, typename T, typename F, typename Finish>
C10_ALWAYS_INLINE int64_t silu_two_pass(const T* x, int64_t n, const F& f, Prefetch<T> pf, const Finish& finish) {
  constexpr int64_t S = VecIO<T>::kStep;
  alignas(64) float vbuf[kActPart], eb[kActPart];
  int64_t i = 0;
  while (i + S <= n) {
    const int64_t len = std::min(kActPart, (n - i) / S * S);
    Exp2Parts pa, pb;  // the step in flight
    auto reduce = [&](int64_t j) {
      pf.at(i + j);
      Vec va, vb;
      VecIO<T>::load(x + i + j, va, vb);
      va = va - f.mu.vec(i + j);
      vb = vb - f.mu.vec(i + j + kVec);
      if constexpr (kKeepU) {
        va = at::vec::fmadd(va, f.a.vec(i + j), f.b.vec(i + j));
        vb = at::vec::fmadd(vb, f.a.vec(i + j + kVec), f.b.vec(i + j + kVec));
      }
      va.store(vbuf + j);
      vb.store(vbuf + j + kVec);
      if constexpr (kKeepU) {
        pa = exp2_reduce(va * Vec(-kLog2e));
        pb = exp2_reduce(vb * Vec(-kLog2e));
      } else {
        pa = exp2_reduce(at::vec::fmadd(va, f.a2.vec(i + j), f.b2.vec(i + j)));
        pb = exp2_reduce(at::vec::fmadd(vb, f.a2.vec(i + j + kVec), f.b2.vec(i + j + kVec)));
      }
    };
    reduce(0);
    int64_t j = S;
    for (; j < len; j += S) {
      const Exp2Parts qa = pa, qb = pb;
      reduce(j);
      exp2_finish(qa).store(eb + j - S);
      exp2_finish(qb).store(eb + j - S + kVec);
    }
    exp2_finish(pa).store(eb + j - S);
    exp2_finish(pb).store(eb + j - S + kVec);
    for (j = 0; j < len; j += S)
      finish(i + j, Vec::loadu(vbuf + j), Vec::loadu(vbuf + j + kVec), Vec::loadu(eb + j), Vec::loadu(eb + j + kVec));
    i += len;
  }
  return i;
}

// The last m < kStep values of a run, at i, as one vector step (vec.h: load_padded): x and the
// affine parameters, x zero in the padding lanes. A scalar exp per value cost more than the step (a
// group of 7x7 maps with 8 channels ends in 8 of them).
struct PaddedAffine {
  Vec x[2], mu[2], a[2], b[2];
  template <typename T, typename F>
  C10_ALWAYS_INLINE PaddedAffine(const T* x_, int64_t i, int64_t m, const F& f) {
    load_padded(x_ + i, m, x[0], x[1]);
    f.mu.padded(i, m, mu[0], mu[1]);
    f.a.padded(i, m, a[0], a[1]);
    f.b.padded(i, m, b[0], b[1]);
  }
};

// y = act((x - mu) * a + b). Centring first keeps u exact when rstd is huge (near-constant groups).
// pf: rows to prefetch meanwhile (silu_two_pass). stream: streaming stores for y (vec.h:
// stream_outputs; the caller fences). Always inlined into the row loops: called, it took its Prefetch
// argument through the stack, which a 16-byte reload then waited on (store forwarding), once per row
// (16x256x16x16 forward 0.396-0.401 -> 0.381-0.383 ms, three alternating runs each).
template <typename T, Activation A, typename F>
C10_ALWAYS_INLINE void affine_act(const T* x, T* y, int64_t n, const F& f, Prefetch<T> pf = {},
                                  bool stream = false) {
  const auto &mu = f.mu, &a = f.a, &b = f.b;
  int64_t i = 0;
  if constexpr (A == Activation::SiLU) {
    i = silu_two_pass<true>(x, n, f, pf, [&](int64_t k, const Vec& ua, const Vec& ub, const Vec& ea, const Vec& eb) {
      store_out(y + k, ActVec<A>::f_from_exp(ua, ea), ActVec<A>::f_from_exp(ub, eb), stream);
    });
  }
  for (; i + VecIO<T>::kStep <= n; i += VecIO<T>::kStep) {
    pf.at(i);
    Vec va, vb;
    VecIO<T>::load(x + i, va, vb);
    va = ActVec<A>::f(at::vec::fmadd(va - mu.vec(i), a.vec(i), b.vec(i)));
    vb = ActVec<A>::f(at::vec::fmadd(vb - mu.vec(i + kVec), a.vec(i + kVec), b.vec(i + kVec)));
    store_out(y + i, va, vb, stream);
  }
  if (i < n) {
    const PaddedAffine t(x, i, n - i, f);
    store_first(y + i, n - i, ActVec<A>::f(at::vec::fmadd(t.x[0] - t.mu[0], t.a[0], t.b[0])),
                ActVec<A>::f(at::vec::fmadd(t.x[1] - t.mu[1], t.a[1], t.b[1])));
  }
}

// Where grad_sums adds du (x - mu) and du: into dsc[0], db[0] (a row of one channel, NCHW), into
// dsc[i], db[i] (channels-last rows, one channel per lane), or nowhere (NCHW short rows, whose
// per-channel sums row_grad_sums takes from du).
enum class SumsTo { Whole, Lanes, None };

// Backward, pass 1: du = dy * act'((x - mu) * a + b), kept in a float32 scratch row (the
// activation's derivative is the expensive part; pass 2 then costs two loads and two FMAs);
// accumulates du * (x - mu) and du as kSums says.
template <typename T, Activation A, SumsTo kSums, typename F>
inline void grad_sums(const T* x, const T* dy, int64_t n, const F& f, float* du_out, float* dsc, float* db,
                      Prefetch<T> pf = {}) {
  const auto &mu = f.mu, &a = f.a, &b = f.b;
  Vec s1(0.f), s2(0.f);
  // given xc = x - mu and act'(u) for the 2 kVec values at i
  auto accumulate = [&](int64_t i, const Vec& xa, const Vec& xb, const Vec& dfa, const Vec& dfb) {
    Vec ga, gb;
    VecIO<T>::load(dy + i, ga, gb);
    const Vec dua = ga * dfa, dub = gb * dfb;
    dua.store(du_out + i);
    dub.store(du_out + i + kVec);
    if constexpr (kSums == SumsTo::Lanes) {
      (Vec::loadu(dsc + i) + xa * dua).store(dsc + i);
      (Vec::loadu(dsc + i + kVec) + xb * dub).store(dsc + i + kVec);
      (Vec::loadu(db + i) + dua).store(db + i);
      (Vec::loadu(db + i + kVec) + dub).store(db + i + kVec);
    } else if constexpr (kSums == SumsTo::Whole) {
      s1 = s1 + xa * dua + xb * dub;
      s2 = s2 + dua + dub;
    }
  };
  int64_t i = 0;
  if constexpr (A == Activation::SiLU) {
    i = silu_two_pass<false>(x, n, f, pf, [&](int64_t k, const Vec& xa, const Vec& xb, const Vec& ea, const Vec& eb) {
      const Vec ua = at::vec::fmadd(xa, a.vec(k), b.vec(k)), ub = at::vec::fmadd(xb, a.vec(k + kVec), b.vec(k + kVec));
      accumulate(k, xa, xb, ActVec<A>::df_from_exp(ua, ea), ActVec<A>::df_from_exp(ub, eb));
    });
  }
  for (; i + VecIO<T>::kStep <= n; i += VecIO<T>::kStep) {
    Vec xa, xb;
    VecIO<T>::load(x + i, xa, xb);
    xa = xa - mu.vec(i);
    xb = xb - mu.vec(i + kVec);
    accumulate(i, xa, xb, ActVec<A>::df(at::vec::fmadd(xa, a.vec(i), b.vec(i))),
               ActVec<A>::df(at::vec::fmadd(xb, a.vec(i + kVec), b.vec(i + kVec))));
  }
  if (i < n) {  // the last values (PaddedAffine); zero dy in the padding makes its du, and sums, zero
    const int64_t m = n - i;
    const PaddedAffine t(x, i, m, f);
    Vec ga, gb;
    load_padded(dy + i, m, ga, gb);
    const Vec xa = t.x[0] - t.mu[0], xb = t.x[1] - t.mu[1];
    const Vec dua = ga * ActVec<A>::df(at::vec::fmadd(xa, t.a[0], t.b[0]));
    const Vec dub = gb * ActVec<A>::df(at::vec::fmadd(xb, t.a[1], t.b[1]));
    store_first(du_out + i, m, dua, dub);
    if constexpr (kSums == SumsTo::Lanes) {
      for (int64_t j = i; j < n; ++j) {
        dsc[j] += du_out[j] * (static_cast<float>(x[j]) - mu.at(j));
        db[j] += du_out[j];
      }
    } else if constexpr (kSums == SumsTo::Whole) {
      s1 = s1 + xa * dua + xb * dub;
      s2 = s2 + dua + dub;
    }
  }
  if constexpr (kSums == SumsTo::Whole) {
    dsc[0] += hsum(s1);
    db[0] += hsum(s2);
  }
}

// Backward, pass 2: dx = k1 * du + k2 * (x - mu) + k3.
template <typename T, typename PM, typename P1, typename P2, typename P3>
inline void grad_apply(const T* x, const float* du, T* dx, int64_t n, PM mu, P1 k1, P2 k2, P3 k3, bool stream) {
  for_each_step<T>(n, stream, [&](int64_t i, auto load, auto store) C10_ALWAYS_INLINE_ATTRIBUTE {
    Vec x2[2], d2[2], m2[2], a2[2], b2[2], c2[2];
    load(x + i, x2[0], x2[1]);
    load(du + i, d2[0], d2[1]);
    load.param(mu, i, m2[0], m2[1]);
    load.param(k1, i, a2[0], a2[1]);
    load.param(k2, i, b2[0], b2[1]);
    load.param(k3, i, c2[0], c2[1]);
    for (int h = 0; h < 2; ++h) x2[h] = at::vec::fmadd(a2[h], d2[h], at::vec::fmadd(b2[h], x2[h] - m2[h], c2[h]));
    store(dx + i, x2[0], x2[1]);
  });
}

// ---------------------------------------------------------------------------------------------
// Scheduling helpers.

// Runs fn(begin, end) over [0, n): threaded, or inline when the caller is already one thread's job.
template <typename Fn>
inline void maybe_parallel(bool parallel, int64_t n, const Fn& fn) {
  if (parallel) {
    at::parallel_for(0, n, 1, fn);
  } else if (n > 0) {
    fn(0, n);
  }
}

// Runs body(unit, split, next) for unit in [0, units): whole units per thread when there are enough
// of them and they are small enough (handed out in runs of consecutive units, parallel.h), else one
// unit at a time with `split` = true so that the body spreads it over the threads. `next` is the
// unit the same worker runs next (-1 if none or split), for prefetching. unit_bytes: the input one
// unit reads.
template <typename Fn>
inline void for_each_unit(int64_t units, int64_t unit_bytes, const Fn& body) {
  const int64_t threads = at::get_num_threads();
  // Whole units only while each worker's unit and the next one it prefetches fit its share of the
  // last-level cache: the second pass over a unit must find it there. Larger units are read by all
  // the workers together (channels-last 4x512x64x64, 8 MB samples: forward 5.2-5.9 -> 4.6-4.9 ms).
  // On the Xeon the last level is a 504 MB L3 that answers slower than the EPYC's 16 MB one, and the
  // second pass must find the unit in the core's L2 instead, beside the output and the next unit
  // passing through: units over a quarter of it (2 MB) are shared too. Same-process timings, forward
  // (2 threads): one group of 1 MB, 8x64x64x64 G=1, 0.59-0.60 -> 0.45-0.51 ms; channels-last samples
  // of 2 and 8 MB, 8x512x32x32 1.12-1.37 -> 1.05-1.16 ms, 4x512x64x64 2.32-2.68 -> 2.00-2.29 ms.
  // Never below 512 KB, which whole units served well on the EPYC (its L2: 512 KB).
  const int64_t core_share = std::max<int64_t>(core_cache_bytes() / 4, int64_t{512} << 10);
  if (units >= threads && 2 * unit_bytes * threads <= last_level_cache_bytes() && unit_bytes <= core_share) {
    parallel_blocks_ahead(units, unit_bytes, [&](int64_t u, int64_t next) { body(u, false, next); });
  } else {
    for (int64_t u = 0; u < units; ++u) body(u, true, int64_t{-1});
  }
}

// How many slices to cut a row of n elements into when spreading `rows` rows over the threads.
inline int64_t slices_per_row(bool split, int64_t rows, int64_t n) {
  if (!split) return 1;
  const int64_t want = (4 * at::get_num_threads() + rows - 1) / rows;
  return std::max<int64_t>(1, std::min(want, n / kMinTask));
}

// NCHW maps smaller than 128 values (11x11, 8x8, 7x7, ..., 1x1): a group's D rows go through each
// pass as one run, vectors straddling the rows, instead of one call per row, which paid the two-pass
// SiLU loop's set-up and pipeline fill and a scalar tail (with a scalar exp) per row. The run takes
// per-lane parameters: w and b repeated along each channel's HW values once per call (ExpandedParams),
// and a = rstd w as ScaledLane over the repeated w. Same-process A/B against one call per row (2
// threads, forward / backward op): 7x7 1.20x / 1.31x, 5x5 2.4x / 2.6x, 10x10 1.22x / 1.15x, 8x8
// 1.00x / 1.04x; from 12x12 (144 values) on the per-row calls win (0.87x / 0.80x): the per-lane
// parameters cost two loads and a multiply per vector, and the backward a pass of its own for the
// per-channel sums (row_grad_sums).
inline bool short_rows(const GroupNormShape& s) { return s.HW < kActPart / 2 && s.D >= 2; }

// The per-channel parameters of the NCHW short-rows path, each repeated HW times in x's channel order:
// w and b, and for the backward the exponent's -w log2(e) and -b log2(e) (Affine).
struct ExpandedParams {
  int64_t n;  // C * HW, the length of each array
  bool backward;
  std::vector<float> v;
  ExpandedParams(const float* w, const float* b, const GroupNormShape& s, bool backward)
      : n(s.C * s.HW), backward(backward), v((backward ? 4 : 2) * n) {
    for (int64_t c = 0; c < s.C; ++c) {
      float* p = v.data() + c * s.HW;
      std::fill(p, p + s.HW, w[c]);
      std::fill(p + n, p + n + s.HW, b[c]);
      if (backward) {
        std::fill(p + 2 * n, p + 2 * n + s.HW, -w[c] * kLog2e);
        std::fill(p + 3 * n, p + 3 * n + s.HW, -b[c] * kLog2e);
      }
    }
  }
  // Group g's parameters (its first value is at g * D * HW of a sample); a2, b2 only for the backward.
  Affine<Broadcast, ScaledLane, PerLane> group(int64_t g, int64_t M, float mu, float r) const {
    const float* p = v.data() + g * M;
    const float* q = backward ? p + 2 * n : p;
    return {{mu}, {p, r}, {p + n}, {q, r}, {q + n}};
  }
};

// Per-row sums of du (x - mu) and du over D rows of L values, added to dsc[d], db[d].
template <typename T>
void row_grad_sums(const T* x, const float* du, int64_t D, int64_t L, float mu, double* dsc, double* db) {
  const Vec vm(mu);
  for (int64_t d = 0; d < D; ++d) {
    const T* xr = x + d * L;
    const float* g = du + d * L;
    Vec s1(0.f), s2(0.f);
    for_each_step<T>(L, false, [&](int64_t i, auto load, auto) {  // zero du in a padded step adds nothing
      Vec xa, xb, ga, gb;
      load(xr + i, xa, xb);
      load(g + i, ga, gb);
      s1 = at::vec::fmadd(ga, xa - vm, s1);
      s1 = at::vec::fmadd(gb, xb - vm, s1);
      s2 = s2 + ga + gb;
    });
    dsc[d] += hsum(s1);
    db[d] += hsum(s2);
  }
}

inline void mean_rstd(double s1, double s2, double count, float pivot, double eps, float& mu, float& r) {
  const double m = s1 / count;
  const double var = std::max(s2 / count - m * m, 0.0);
  mu = static_cast<float>(pivot + m);
  r = static_cast<float>(1.0 / std::sqrt(var + eps));
}

// Scratch floats for the group a thread is on: a per-thread buffer reused across groups and calls
// up to 1 MB, its own allocation above. Three mallocs per group were ~2% of a 16x256x16x16
// forward+backward (512 groups; 1.55 -> 1.52 ms over three alternating bench runs).
struct GroupScratch {
  static constexpr int64_t kKeep = int64_t{1} << 18;
  std::unique_ptr<float[]> own;
  float* p;
  explicit GroupScratch(int64_t n) {
    thread_local std::vector<float> keep;
    if (n <= kKeep) {
      if (static_cast<int64_t>(keep.size()) < n) keep.resize(n);
      p = keep.data();
    } else {
      own.reset(new float[n]);
      p = own.get();
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T, Activation A>
void forward_nchw(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                  const GroupNormShape& s, double eps) {
  const int64_t M = s.D * s.HW;
  const bool stream = stream_outputs(2 * s.N * s.G * M * sizeof(T));
  const bool short_r = short_rows(s);
  const std::unique_ptr<ExpandedParams> ex(short_r ? new ExpandedParams(w, b, s, false) : nullptr);
  for_each_unit(s.N * s.G, M * sizeof(T), [&](int64_t ng, bool split, int64_t next) {
    const T* xg = x + ng * M;
    T* yg = y + ng * M;
    const int64_t g = ng % s.G;
    const float pivot = static_cast<float>(xg[0]);
    const int64_t K = slices_per_row(split, s.D, s.HW), L = (s.HW + K - 1) / K;
    // The statistics ignore channel boundaries: the group is one contiguous run of M values, cut
    // into as many equal slices as there are tasks (one when a thread owns the whole group).
    double s1 = 0, s2 = 0;
    if (split) {
      const int64_t tasks = s.D * K, LM = (M + tasks - 1) / tasks;
      std::vector<double> part(2 * tasks, 0.0);
      maybe_parallel(true, tasks, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t lo = t * LM, hi = std::min(M, lo + LM);
          if (lo < hi) std::tie(part[2 * t], part[2 * t + 1]) = shifted_sums(xg + lo, hi - lo, pivot);
        }
      });
      for (int64_t t = 0; t < tasks; ++t) s1 += part[2 * t], s2 += part[2 * t + 1];
    } else {
      std::tie(s1, s2) = shifted_sums(xg, M, pivot);
    }
    float mu, r;
    mean_rstd(s1, s2, static_cast<double>(M), pivot, eps, mu, r);
    mean[ng] = mu;
    rstd[ng] = r;
    if (!split && short_r) {  // short rows: the whole group in one call (short_rows)
      const Prefetch<T> pf = next < 0 ? Prefetch<T>{}
                             : Prefetch<T>{x + next * M, nullptr, stream ? nullptr : y + next * M};
      affine_act<T, A>(xg, yg, M, ex->group(g, M, mu, r), pf, stream);
      if (stream) stream_fence();
      return;
    }
    maybe_parallel(split, s.D * K, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t d = t / K, lo = (t % K) * L, hi = std::min(s.HW, lo + L);
        if (lo >= hi) continue;
        const int64_t c = g * s.D + d;
        const float a = r * w[c];
        const int64_t off = d * s.HW + lo;
        // y's next lines are fetched for writing unless streaming stores bypass the cache
        const Prefetch<T> pf = next < 0 ? Prefetch<T>{}
                               : Prefetch<T>{x + next * M + off, nullptr, stream ? nullptr : y + next * M + off};
        affine_act<T, A>(xg + off, yg + off, hi - lo, affine(mu, a, b[c]), pf, stream);
      }
      if (stream) stream_fence();
    });
  });
}

// Pixel blocks of one channels-last sample: [blk * P, min(HW, (blk + 1) * P)).
struct PixelBlocks {
  int64_t count, size;
  PixelBlocks(bool split, int64_t HW, int64_t C) {
    count = split ? std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(),
                                                            HW * C / kMinTask)) : 1;
    size = (HW + count - 1) / count;
  }
};

// Per-channel sums over the pixel rows of one channels-last sample, one float64 [2, C] slot per
// block: rows(p, q, acc1, acc2) adds rows [p, q) into float32 accumulators, flushed every kFlushRows rows.
template <typename RowsFn>
std::vector<double> channel_block_sums(bool split, const PixelBlocks& pb, int64_t HW, int64_t C, const RowsFn& rows) {
  std::vector<double> part(2 * pb.count * C, 0.0);
  maybe_parallel(split, pb.count, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(2 * C);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t p_end = std::min(HW, (blk + 1) * pb.size);
      double* out = part.data() + 2 * blk * C;
      for (int64_t p = blk * pb.size; p < p_end;) {
        const int64_t q = std::min(p_end, p + kFlushRows);
        std::fill(acc.begin(), acc.end(), 0.f);
        rows(p, q, acc.data(), acc.data() + C);
        p = q;
        for (int64_t c = 0; c < C; ++c) out[c] += acc[c], out[C + c] += acc[C + c];
      }
    }
  });
  return part;
}

template <typename T, Activation A>
void forward_nhwc(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                  const GroupNormShape& s, double eps) {
  const int64_t C = s.C, HW = s.HW;
  const bool stream = stream_outputs(2 * s.N * HW * C * sizeof(T));
  for_each_unit(s.N, HW * C * sizeof(T), [&](int64_t n, bool split, int64_t next) {
    const T* xn = x + n * HW * C;
    T* yn = y + n * HW * C;
    std::vector<float> pivot(C);
    // Rows per affine_act call: a row shorter than the SiLU's kActPart run would pay that loop's
    // set-up and pipeline fill alone (16x128x32x32 forward 2.5% faster, one and two threads, A/B).
    const int64_t R = std::max<int64_t>(1, kActPart / C);
    LaneAffine f(C, R);
    for (int64_t c = 0; c < C; ++c) pivot[c] = static_cast<float>(xn[(c / s.D) * s.D]);
    const PixelBlocks pb(split, HW, C);
    const std::vector<double> part = channel_block_sums(split, pb, HW, C, [&](int64_t p, int64_t q, float* a1, float* a2) {
      shifted_sums_lanes(xn + p * C, q - p, C, pivot.data(), a1, a2);
    });
    for (int64_t g = 0; g < s.G; ++g) {
      double s1 = 0, s2 = 0;
      for (int64_t blk = 0; blk < pb.count; ++blk)
        for (int64_t c = g * s.D; c < (g + 1) * s.D; ++c)
          s1 += part[2 * blk * C + c], s2 += part[2 * blk * C + C + c];
      float mu, r;
      mean_rstd(s1, s2, static_cast<double>(s.D * HW), pivot[g * s.D], eps, mu, r);
      mean[n * s.G + g] = mu;
      rstd[n * s.G + g] = r;
      for (int64_t c = g * s.D; c < (g + 1) * s.D; ++c) f.set(c, mu, r * w[c], b[c]);
    }
    const Affine<PerLane> lanes = f.lanes();
    maybe_parallel(split, pb.count, [&](int64_t b0, int64_t b1) {
      const int64_t p_end = std::min(HW, b1 * pb.size);
      for (int64_t p = b0 * pb.size; p < p_end; p += R)
        affine_act<T, A>(xn + p * C, yn + p * C, std::min(R, p_end - p) * C, lanes,
                         next >= 0 ? Prefetch<T>{x + (next * HW + p) * C} : Prefetch<T>{}, stream);
      if (stream) stream_fence();
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Backward. dsc/dbs: float64 [N, C] sums per (sample, channel), reduced into dweight/dbias after.

// Per (n, g): the coefficients of dx = k1 * du + k2 * (x - mu) + k3 for the group's channels
// c0 + d, d < D, written to k1[d], k2[d], k3[d].
inline void dx_coefficients(const double* dsc, const double* dbs, const float* w, float r, int64_t c0,
                            int64_t D, double M, float* k1, float* k2, float* k3) {
  double A = 0, B = 0;
  for (int64_t c = c0; c < c0 + D; ++c) A += w[c] * dbs[c], B += w[c] * r * dsc[c];
  A /= M;
  B /= M;
  for (int64_t d = 0; d < D; ++d) {
    k1[d] = r * w[c0 + d];
    k2[d] = static_cast<float>(-double(r) * r * B);
    k3[d] = static_cast<float>(-double(r) * A);
  }
}


template <typename T, Activation A>
void backward_nchw(const T* dy, const T* x, const float* w, const float* b, const float* mean,
                   const float* rstd, T* dx, double* dsc, double* dbs, const GroupNormShape& s) {
  const int64_t M = s.D * s.HW;
  const bool stream = stream_outputs(3 * s.N * s.G * M * sizeof(T));
  const bool short_r = short_rows(s);
  const std::unique_ptr<ExpandedParams> ex(short_r ? new ExpandedParams(w, b, s, true) : nullptr);
  for_each_unit(s.N * s.G, M * sizeof(T), [&](int64_t ng, bool split, int64_t next) {
    const int64_t n = ng / s.G, g = ng % s.G, c0 = g * s.D, off0 = ng * M;
    const float mu = mean[ng], r = rstd[ng];
    const int64_t K = slices_per_row(split, s.D, s.HW), L = (s.HW + K - 1) / K;
    const int64_t ahead = (next - ng) * M;  // from a place in this group to the same place in the next
    // this group's du (cache-resident between the passes), its partial sums and dx coefficients
    GroupScratch scratch(M + 2 * s.D * K + 3 * s.D);
    float *du = scratch.p, *part = du + M, *k = part + 2 * s.D * K;
    if (!split && short_r) {  // short rows: the whole group in each pass (short_rows)
      const auto f = ex->group(g, M, mu, r);
      const Prefetch<T> pf{next >= 0 ? x + off0 + ahead : nullptr, next >= 0 ? dy + off0 + ahead : nullptr,
                           stream ? nullptr : dx + off0};
      grad_sums<T, A, SumsTo::None>(x + off0, dy + off0, M, f, du, nullptr, nullptr, pf);
      row_grad_sums(x + off0, du, s.D, s.HW, mu, dsc + n * s.C + c0, dbs + n * s.C + c0);
      dx_coefficients(dsc + n * s.C, dbs + n * s.C, w, r, c0, s.D, double(M), k, k + s.D, k + 2 * s.D);
      // k1 = rstd w per channel is f.a; k2 and k3 are the same for all the group's channels
      grad_apply<T>(x + off0, du, dx + off0, M, Broadcast{mu}, f.a, Broadcast{k[s.D]}, Broadcast{k[2 * s.D]},
                    stream);
      if (stream) stream_fence();
      return;
    }
    std::fill(part, part + 2 * s.D * K, 0.f);
    maybe_parallel(split, s.D * K, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t d = t / K, lo = (t % K) * L, hi = std::min(s.HW, lo + L);
        if (lo >= hi) continue;
        const float a = r * w[c0 + d];
        const int64_t off = off0 + d * s.HW + lo;
        const Prefetch<T> pf{next >= 0 ? x + off + ahead : nullptr, next >= 0 ? dy + off + ahead : nullptr,
                             stream ? nullptr : dx + off};
        grad_sums<T, A, SumsTo::Whole>(x + off, dy + off, hi - lo, affine(mu, a, b[c0 + d]), du + (off - off0),
                                       &part[2 * t], &part[2 * t + 1], pf);
      }
    });
    for (int64_t t = 0; t < s.D * K; ++t) {
      dsc[n * s.C + c0 + t / K] += part[2 * t];
      dbs[n * s.C + c0 + t / K] += part[2 * t + 1];
    }
    dx_coefficients(dsc + n * s.C, dbs + n * s.C, w, r, c0, s.D, double(M), k, k + s.D, k + 2 * s.D);
    maybe_parallel(split, s.D * K, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t d = t / K, lo = (t % K) * L, hi = std::min(s.HW, lo + L);
        if (lo >= hi) continue;
        const int64_t off = off0 + d * s.HW + lo;
        grad_apply<T>(x + off, du + (off - off0), dx + off, hi - lo, Broadcast{mu}, Broadcast{k[d]},
                      Broadcast{k[s.D + d]}, Broadcast{k[2 * s.D + d]}, stream);
      }
      if (stream) stream_fence();
    });
  });
}

template <typename T, Activation A>
void backward_nhwc(const T* dy, const T* x, const float* w, const float* b, const float* mean,
                   const float* rstd, T* dx, double* dsc, double* dbs, const GroupNormShape& s) {
  const int64_t C = s.C, HW = s.HW;
  const bool stream = stream_outputs(3 * s.N * HW * C * sizeof(T));
  for_each_unit(s.N, HW * C * sizeof(T), [&](int64_t n, bool split, int64_t) {
    const int64_t base = n * HW * C;
    LaneAffine f(C);  // to recompute u
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * s.G + c / s.D;
      f.set(c, mean[ng], rstd[ng] * w[c], b[c]);
    }
    const Affine<PerLane> lanes = f.lanes();
    std::vector<float> k(3 * C);  // the dx coefficients k1..k3 per channel
    float *k1 = k.data(), *k2 = k1 + C, *k3 = k2 + C;
    const PixelBlocks pb(split, HW, C);
    std::unique_ptr<float[]> du(new float[HW * C]);  // this sample's du
    const std::vector<double> part = channel_block_sums(split, pb, HW, C, [&](int64_t p, int64_t q, float* a1, float* a2) {
      for (; p < q; ++p)
        grad_sums<T, A, SumsTo::Lanes>(x + base + p * C, dy + base + p * C, C, lanes, du.get() + p * C, a1, a2);
    });
    for (int64_t blk = 0; blk < pb.count; ++blk)
      for (int64_t c = 0; c < C; ++c)
        dsc[n * C + c] += part[2 * blk * C + c], dbs[n * C + c] += part[2 * blk * C + C + c];
    for (int64_t g = 0; g < s.G; ++g)
      dx_coefficients(dsc + n * C, dbs + n * C, w, rstd[n * s.G + g], g * s.D, s.D,
                      double(s.D * HW), k1 + g * s.D, k2 + g * s.D, k3 + g * s.D);
    maybe_parallel(split, pb.count, [&](int64_t b0, int64_t b1) {
      for (int64_t p = b0 * pb.size; p < std::min(HW, b1 * pb.size); ++p) {
        const int64_t off = base + p * C;
        grad_apply<T>(x + off, du.get() + p * C, dx + off, C, lanes.mu, PerLane{k1}, PerLane{k2}, PerLane{k3},
                      stream);
      }
      if (stream) stream_fence();
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points (registered below for the CPU dispatch key).

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, c10::string_view activation) {
  ForwardCall c = prepare_forward(x_in, weight, bias, num_groups, eps, activation);
  if (c.x.numel() == 0) return {c.y, c.mean, c.rstd};
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu", [&] {
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      auto kernel = c.s.channels_last ? forward_nhwc<scalar_t, A> : forward_nchw<scalar_t, A>;
      kernel(c.x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
             c.y.mutable_data_ptr<scalar_t>(), c.mean.mutable_data_ptr<float>(),
             c.rstd.mutable_data_ptr<float>(), c.s, eps);
    });
  });
  return {c.y, c.mean, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    int64_t num_groups, c10::string_view activation) {
  BackwardCall c = prepare_backward(grad_y, x_in, weight, bias, mean_in, rstd_in, num_groups, activation);
  const GroupNormShape& s = c.s;
  const auto opts = c.x.options();
  if (c.x.numel() == 0) {
    return {c.dx, at::zeros({s.C}, opts.dtype(c.weight_grad_dtype)), at::zeros({s.C}, opts.dtype(c.bias_grad_dtype))};
  }
  at::Tensor dsc = at::zeros({s.N, s.C}, opts.dtype(at::kDouble));
  at::Tensor dbs = at::zeros({s.N, s.C}, opts.dtype(at::kDouble));
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu_backward", [&] {
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      auto kernel = s.channels_last ? backward_nhwc<scalar_t, A> : backward_nchw<scalar_t, A>;
      kernel(c.dy.const_data_ptr<scalar_t>(), c.x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
             b.const_data_ptr<float>(), c.mean.const_data_ptr<float>(), c.rstd.const_data_ptr<float>(),
             c.dx.mutable_data_ptr<scalar_t>(), dsc.mutable_data_ptr<double>(), dbs.mutable_data_ptr<double>(), s);
    });
  });
  // dweight_c = sum_n rstd[n, g(c)] * dsc[n, c];  dbias_c = sum_n dbs[n, c]  ([N, C]: a plain loop)
  at::Tensor dw = at::empty({s.C}, opts.dtype(at::kFloat)), db = at::empty({s.C}, opts.dtype(at::kFloat));
  const double *pdsc = dsc.const_data_ptr<double>(), *pdbs = dbs.const_data_ptr<double>();
  const float* prstd = c.rstd.const_data_ptr<float>();
  for (int64_t ch = 0; ch < s.C; ++ch) {
    double gw = 0, gb = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      gw += prstd[n * s.G + ch / s.D] * pdsc[n * s.C + ch];
      gb += pdbs[n * s.C + ch];
    }
    dw.mutable_data_ptr<float>()[ch] = static_cast<float>(gw);
    db.mutable_data_ptr<float>()[ch] = static_cast<float>(gb);
  }
  return {c.dx, dw.to(c.weight_grad_dtype), db.to(c.bias_grad_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward);
}

}  // namespace genkern::cpu
