// Candidate: GroupNorm+SiLU's one-pass (cluster) kernels for channels-last x, with a cluster owning
// several neighbouring groups of a sample (README.md: group_norm_silu_cl_groups.cu).
//
// In channels-last memory a group is HW rows of D contiguous channels, C apart. The shipped kernels
// (csrc/cuda/group_norm_silu_cluster.cuh) give each group a cluster of its own, so a CTA reads pieces of
// D x element size bytes: 32 bytes at D = 16 in bfloat16, and at the cifar10 U-Net's C = 128 (D = 4) 8
// bytes in one-element accesses, since a 16-byte pack would straddle two groups. Here a cluster owns gpc
// groups (by default the fewest whose rows make 128 bytes), so each row it reads is gpc D channels wide,
// and keeps one mean and rstd per group. Packs hold up to 16 bytes and never straddle a group; the slices
// start at row boundaries, so each thread's packs always hold the same channels, of one group (`sub`).
// The addressing is the shipped one over "super-groups" of gpc D channels (SliceGeometry with G / gpc
// groups of gpc D channels); what changes is the statistics, per group within the super-group.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/group_norm_silu_cluster.cuh"
#include "group_norm_silu.h"

namespace genkern::cuda {
namespace {

constexpr int kMaxGroupsPerCluster = kWarp;  // gpc * (packs per group row) <= 32 lanes
constexpr int kCandidateMinBlocks = 3;      // as the shipped kernels (group_norm_silu.cu: kClusterMinBlocks)

struct GroupsGeometry {
  SliceGeometry g;  // over super-groups: g.G = G / gpc, g.D = gpc D, g.len = gpc D HW
  int gpc;          // groups per super-group
  int qd;           // packs per group row (D / V)
};

// The shape seen as G / gpc super-groups of gpc D channels (what SliceGeometry and param_grads take).
GroupNormShape super_shape(const GroupNormShape& s, int64_t gpc) {
  GroupNormShape sup = s;
  sup.G = s.G / gpc;
  sup.D = s.D * gpc;
  return sup;
}

// Widest pack (a power of two of elements, 16 bytes at most) that divides D and that the data's alignment
// allows: a pack never straddles two groups.
int groups_vec(const GroupNormShape& s, const at::Tensor& x, const at::Tensor& dy = {}) {
  const int esize = static_cast<int>(x.element_size());
  const auto aligned = [&](int v) {
    const uintptr_t bytes = static_cast<uintptr_t>(v * esize);
    return reinterpret_cast<uintptr_t>(x.const_data_ptr()) % bytes == 0 &&
           (!dy.defined() || reinterpret_cast<uintptr_t>(dy.const_data_ptr()) % bytes == 0);
  };
  int v = 16 / esize;
  while (v > 1 && (s.D % v != 0 || !aligned(v))) v /= 2;
  return v;
}

// gpc = 0 picks the fewest groups whose rows make 128 bytes (a cache line), or as many as a cluster of
// kMaxCluster slices holds.
GroupsGeometry make_groups_geometry(const GroupNormShape& s, const at::Tensor& x, int vec, int64_t gpc_req,
                                    int64_t slice_bytes) {
  TORCH_CHECK_VALUE(s.channels_last, "group_norm_silu_cl_groups: channels-last x only");
  const int64_t esize = x.element_size(), qd = s.D / vec, group_bytes = s.D * s.HW * esize;
  TORCH_CHECK_VALUE((qd & (qd - 1)) == 0 && qd <= kWarp, "group_norm_silu_cl_groups: D / pack width (", s.D, " / ",
                    vec, ") must be a power of two up to 32");
  int64_t gpc = gpc_req;
  if (gpc == 0) {
    gpc = 1;
    while (gpc * s.D * esize < 128 && s.G % (2 * gpc) == 0 && 2 * gpc * qd <= kWarp &&
           2 * gpc * group_bytes <= kMaxCluster * slice_bytes)
      gpc *= 2;
  }
  TORCH_CHECK_VALUE(gpc >= 1 && (gpc & (gpc - 1)) == 0 && s.G % gpc == 0 && gpc * qd <= kWarp,
                    "group_norm_silu_cl_groups: groups per cluster (", gpc,
                    ") must be a power of two dividing num_groups with gpc * D / pack <= 32");
  const GroupNormShape sup = super_shape(s, gpc);
  SliceGeometry g = make_slice_geometry(sup, x, vec, slice_bytes);
  TORCH_CHECK_VALUE(g.k > 0, "group_norm_silu_cl_groups: the one-pass path does not take this shape or GPU (",
                    gpc, " groups of ", group_bytes, " bytes)");
  // slices start at row boundaries, so that a thread's packs keep the same channels in every slice
  g.slice = static_cast<int>(((g.len + g.k - 1) / g.k + sup.D - 1) / sup.D * sup.D);
  return {g, static_cast<int>(gpc), static_cast<int>(qd)};
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// (a, b) summed over the cluster's threads of each group and returned to each thread for its own group
// `sub`. A thread's group is ((threadIdx.x % q) / qd) with q = gpc qd packs per row (q divides 32): lanes
// l and l ^ o hold the same group when o >= q (the same channels) or o < qd (packs of one group's row).
// Fixed order throughout: the statistics do not depend on scheduling.
__device__ __forceinline__ void cluster_sum2_by_group(cooperative_groups::cluster_group& cluster, float& a,
                                                      float& b, int sub, int q, int qd, int gpc) {
  __shared__ float warp_sums[kClusterThreads / kWarp][kMaxGroupsPerCluster][2];
  __shared__ float partial[kMaxGroupsPerCluster][2];
  __shared__ float total[kMaxGroupsPerCluster][2];
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    if (o >= q || o < qd) {  // the same for every lane
      a += __shfl_xor_sync(0xffffffffu, a, o);
      b += __shfl_xor_sync(0xffffffffu, b, o);
    }
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane < q && lane % qd == 0) warp_sums[warp][lane / qd][0] = a, warp_sums[warp][lane / qd][1] = b;
  __syncthreads();
  if (threadIdx.x < gpc) {
    float s = 0.f, t = 0.f;
    for (int w = 0; w < kClusterThreads / kWarp; ++w) s += warp_sums[w][threadIdx.x][0], t += warp_sums[w][threadIdx.x][1];
    partial[threadIdx.x][0] = s;
    partial[threadIdx.x][1] = t;
  }
  cluster.sync();  // every CTA's partials are written
  if (threadIdx.x < gpc) {
    float s = 0.f, t = 0.f;
    for (unsigned r = 0; r < cluster.num_blocks(); ++r) {
      const float* p = cluster.map_shared_rank(&partial[0][0], r);
      s += p[2 * threadIdx.x];
      t += p[2 * threadIdx.x + 1];
    }
    total[threadIdx.x][0] = s;
    total[threadIdx.x][1] = t;
  }
  cluster.sync();  // the partials have been read (a CTA may now exit) and total[] is visible
  a = total[sub][0];
  b = total[sub][1];
}
#endif

template <typename T, int V, Activation A>
__global__ void __launch_bounds__(kClusterThreads, kCandidateMinBlocks)
    groups_forward_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                          const float* __restrict__ b, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                          SliceGeometry g, int gpc, int qd, float eps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using P = VecPack<T, V>;
  extern __shared__ __align__(16) unsigned char smem[];
  P* cache = reinterpret_cast<P*>(smem);
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t ng = blockIdx.x / g.k, n = ng / g.G;  // (sample, super-group)
  const int sg = static_cast<int>(ng % g.G);
  const int64_t sample = n * static_cast<int64_t>(g.C) * g.HW;
  const T* xs = x + sample;
  T* ys = y + sample;
  const int lo = rank * g.slice, hi = min(g.len, lo + g.slice);
  const int packs = max(0, (hi - lo) / V);
  const int q = g.D / V, D = g.D / gpc, sub = (threadIdx.x % q) / qd;
  const float pivot = static_cast<float>(xs[g.offset<true>(sg, sub * D)]);  // the group's first element

  float s1 = 0.f, s2 = 0.f;
#pragma unroll 4
  for (int j = threadIdx.x; j < packs; j += kClusterThreads) {
    const P p = *reinterpret_cast<const P*>(xs + g.offset<true>(sg, lo + j * V));
    cache[j] = p;
    add_shifted(p, pivot, s1, s2);
  }
  cluster_sum2_by_group(cluster, s1, s2, sub, q, qd, gpc);
  float mean, rstd;
  stats_from_shifted(s1, s2, static_cast<float>(g.len / gpc), pivot, eps, mean, rstd);
  if (rank == 0 && threadIdx.x < q && threadIdx.x % qd == 0) {
    const int64_t i = (n * g.G + sg) * gpc + sub;
    mean_out[i] = mean;
    rstd_out[i] = rstd;
  }
  const int c0 = sg * g.D;
#pragma unroll 4
  for (int j = threadIdx.x; j < packs; j += kClusterThreads) {
    const int i = lo + j * V, d = i % g.D;
    const P p = cache[j];
    P o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = c0 + d + e;
      o.v[e] = static_cast<T>(Act<A>::f((static_cast<float>(p.v[e]) - mean) * (rstd * w[c]) + b[c]));
    }
    *reinterpret_cast<P*>(ys + g.offset<true>(sg, i)) = o;
  }
#endif
}

// The backward on the same clusters (the shipped cluster_backward_kernel's channels-last path, with the
// group sums per group): part[cta, d] = (rstd_d sum du (x - mean_d), sum du) for channel d of the
// super-group, which param_grads adds up as for G / gpc groups of gpc D channels.
template <typename T, int V, Activation A>
__global__ void __launch_bounds__(kClusterThreads, kCandidateMinBlocks)
    groups_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                           const float* __restrict__ w, const float* __restrict__ b,
                           const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                           float* __restrict__ part, SliceGeometry g, int gpc, int qd) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using P = VecPack<T, V>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int max_packs = g.slice / V;
  P* cache_x = reinterpret_cast<P*>(smem);
  P* cache_dy = cache_x + max_packs;
  float* acc = reinterpret_cast<float*>(cache_dy + max_packs);  // [2, gpc D]: sum du (x - mean), sum du
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t ng = blockIdx.x / g.k, n = ng / g.G;
  const int sg = static_cast<int>(ng % g.G), c0 = sg * g.D;
  const int64_t sample = n * static_cast<int64_t>(g.C) * g.HW;
  const int lo = rank * g.slice, hi = min(g.len, lo + g.slice);
  const int packs = max(0, (hi - lo) / V);
  const int q = g.D / V, D = g.D / gpc, sub = (threadIdx.x % q) / qd;
  const int64_t stats0 = (n * g.G + sg) * gpc;  // the super-group's first group in mean/rstd
  const float mean = mean_in[stats0 + sub], rstd = rstd_in[stats0 + sub];
  const int lane = threadIdx.x % kWarp;
  for (int d = threadIdx.x; d < 2 * g.D; d += kClusterThreads) acc[d] = 0.f;
  __syncthreads();

  float cs[V], cb[V];
#pragma unroll
  for (int e = 0; e < V; ++e) cs[e] = cb[e] = 0.f;
  float sa = 0.f, sb = 0.f;  // the group's sums of w_c du and w_c du (x - mean)
  for (int j = threadIdx.x; j < packs; j += kClusterThreads) {
    const int i = lo + j * V, d = i % g.D;
    const int off = g.offset<true>(sg, i);
    const P px = *reinterpret_cast<const P*>(x + sample + off);
    const P pdy = *reinterpret_cast<const P*>(dy + sample + off);
    cache_x[j] = px;
    cache_dy[j] = pdy;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = c0 + d + e;
      const float xc = static_cast<float>(px.v[e]) - mean, wc = w[c];
      const float du = static_cast<float>(pdy.v[e]) * Act<A>::df(xc * (rstd * wc) + b[c]);
      sa += wc * du;
      sb += wc * du * xc;
      cs[e] += du * xc;
      cb[e] += du;
    }
  }
  if (packs > 0) {  // the same in every thread of the CTA
    const int d = (threadIdx.x % q) * V;  // lo is a multiple of the row, gpc D
#pragma unroll
    for (int e = 0; e < V; ++e) {
      for (int o = kWarp / 2; o >= q; o >>= 1) {  // lanes l and l ^ o hold the same channels
        cs[e] += __shfl_xor_sync(0xffffffffu, cs[e], o);
        cb[e] += __shfl_xor_sync(0xffffffffu, cb[e], o);
      }
      if (lane < q) {
        atomicAdd(&acc[d + e], cs[e]);
        atomicAdd(&acc[g.D + d + e], cb[e]);
      }
    }
  }
  cluster_sum2_by_group(cluster, sa, sb, sub, q, qd, gpc);  // its barriers also order the atomics above
  float* out = part + blockIdx.x * static_cast<int64_t>(2 * g.D);
  for (int d = threadIdx.x; d < g.D; d += kClusterThreads) {
    out[2 * d] = rstd_in[stats0 + d / D] * acc[d];
    out[2 * d + 1] = acc[g.D + d];
  }

  // dx = rstd w_c du - rstd A - rstd^2 B (x - mean) with the group's A = sa / M, B = rstd sb / M
  const float inv_m = 1.f / static_cast<float>(g.len / gpc);
  const float k2 = -rstd * rstd * rstd * sb * inv_m, k3 = -rstd * sa * inv_m;
  T* dxs = dx + sample;
  for (int j = threadIdx.x; j < packs; j += kClusterThreads) {
    const int i = lo + j * V, d = i % g.D;
    const P px = cache_x[j], pdy = cache_dy[j];
    P o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = c0 + d + e;
      const float xc = static_cast<float>(px.v[e]) - mean, a = rstd * w[c];
      const float du = static_cast<float>(pdy.v[e]) * Act<A>::df(xc * a + b[c]);
      o.v[e] = static_cast<T>(a * du + k2 * xc + k3);
    }
    *reinterpret_cast<P*>(dxs + g.offset<true>(sg, i)) = o;
  }
#endif
}

// fn(TypeTag<T>, integral_constant V) for the call's dtype and pack width (SiLU only: the
// timed case; fewer kernels to build).
template <typename Fn>
void dispatch_groups(at::ScalarType dtype, Activation act, int vec, Fn&& fn) {
  TORCH_CHECK_VALUE(act == Activation::SiLU, "group_norm_silu_cl_groups: activation \"silu\" only");
  GENKERN_DISPATCH_FLOAT_TYPES(dtype, "group_norm_silu_cl_groups", [&] {
    bool done = false;
    const auto with = [&](auto v) {
      if constexpr (decltype(v)::value <= kPack16<scalar_t>) {
        if (vec == decltype(v)::value) fn(TypeTag<scalar_t>{}, v), done = true;
      }
    };
    with(std::integral_constant<int, 1>{});
    with(std::integral_constant<int, 2>{});
    with(std::integral_constant<int, 4>{});
    with(std::integral_constant<int, 8>{});
    TORCH_CHECK(done, "group_norm_silu_cl_groups: no kernel for packs of ", vec);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cl_groups(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, c10::string_view activation, int64_t groups_per_cluster) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  ForwardCall c = prepare_forward(x_in, weight, bias, num_groups, eps, activation);
  TORCH_CHECK_VALUE(c.x.numel() > 0, "group_norm_silu_cl_groups: empty x");
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  const int vec = groups_vec(c.s, c.x);
  const GroupsGeometry gg = make_groups_geometry(c.s, c.x, vec, groups_per_cluster, kSliceBytes);
  const SliceGeometry& g = gg.g;
  dispatch_groups(c.x.scalar_type(), c.act, vec, [&](auto t, auto v) {
    using T = typename decltype(t)::type;
    constexpr int V = decltype(v)::value;
    static DynamicSmemLimit smem_limit;
    const size_t smem = static_cast<size_t>(g.slice / V) * sizeof(VecPack<T, V>);
    launch_clusters(&groups_forward_kernel<T, V, Activation::SiLU>, c.s.N * g.G * g.k, g.k, smem, smem_limit,
                    c.x.const_data_ptr<T>(), c.y.mutable_data_ptr<T>(), w.const_data_ptr<float>(),
                    b.const_data_ptr<float>(), c.mean.mutable_data_ptr<float>(), c.rstd.mutable_data_ptr<float>(), g,
                    gg.gpc, gg.qd, static_cast<float>(eps));
  });
  return {c.y, c.mean, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cl_groups_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    c10::string_view activation, int64_t groups_per_cluster) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  BackwardCall c = prepare_backward(grad_y, x_in, weight, bias, mean, rstd, num_groups, activation);
  TORCH_CHECK_VALUE(c.x.numel() > 0, "group_norm_silu_cl_groups: empty x");
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  const int vec = groups_vec(c.s, c.x, c.dy);
  const GroupsGeometry gg = make_groups_geometry(c.s, c.x, vec, groups_per_cluster, kGradSliceBytes);
  const SliceGeometry& g = gg.g;
  const GroupNormShape sup = super_shape(c.s, gg.gpc);
  at::Tensor part = at::empty({sup.N, sup.G, g.k, sup.D, 2}, c.x.options().dtype(at::kFloat));
  dispatch_groups(c.x.scalar_type(), c.act, vec, [&](auto t, auto v) {
    using T = typename decltype(t)::type;
    constexpr int V = decltype(v)::value;
    static DynamicSmemLimit smem_limit;
    const size_t smem = 2 * static_cast<size_t>(g.slice / V) * sizeof(VecPack<T, V>) + 2 * g.D * sizeof(float);
    launch_clusters(&groups_backward_kernel<T, V, Activation::SiLU>, c.s.N * g.G * g.k, g.k, smem, smem_limit,
                    c.dy.const_data_ptr<T>(), c.x.const_data_ptr<T>(), c.dx.mutable_data_ptr<T>(),
                    w.const_data_ptr<float>(), b.const_data_ptr<float>(), c.mean.const_data_ptr<float>(),
                    c.rstd.const_data_ptr<float>(), part.mutable_data_ptr<float>(), g, gg.gpc, gg.qd);
  });
  // part is laid out as the shipped kernels' part[N, G, k, D, 2] for G / gpc groups of gpc D channels
  auto [dw, db] = param_grads(part, sup, g.k, c.weight_grad_dtype, c.bias_grad_dtype);
  return {c.dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genkern_candidates, m) {
  m.def("group_norm_silu_cl_groups(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, "
        "str activation, int groups_per_cluster) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_silu_cl_groups_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, int num_groups, str activation, int groups_per_cluster) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(genkern_candidates, CUDA, m) {
  m.impl("group_norm_silu_cl_groups", &group_norm_silu_cl_groups);
  m.impl("group_norm_silu_cl_groups_backward", &group_norm_silu_cl_groups_backward);
}

}  // namespace genkern::cuda
