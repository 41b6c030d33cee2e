// group_norm_silu on CUDA. Maths in csrc/group_norm_silu.h; the same decomposition as the Triton
// kernels (genkern/triton/group_norm_silu.py): x is addressed as [N, HW, C] through strides so NCHW
// and channels-last share the kernels, and each block owns one (sample, group) and a chunk of pixels,
// so that small batches and num_groups = 1 still fill the GPU.
//   forward:  on Hopper, one pass with a thread-block cluster per group (see "one-pass path");
//             elsewhere stats (partial shifted sums per chunk) -> apply (combine, write y, mean, rstd)
//   backward: on Hopper, one pass on the same clusters; elsewhere
//             grad_sums (per-channel partials) -> [N, C] reductions (ATen) -> grad_apply (dx)
#include <cooperative_groups.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "activation.h"
#include "cuda/block_reduce.cuh"
#include "cuda/vec_pack.cuh"
#include "dispatch.h"
#include "group_norm_silu.h"

namespace genkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkElems = 16384;  // elements per block (a chunk of pixels of one group)
constexpr int64_t kMaxChunks = 65535;   // gridDim.y limit

struct Geometry {
  int64_t HW, C, D, G, sN, sP, sC, chunk_p;
  int n_chunks;
  bool channels_last;

  __device__ __forceinline__ int64_t base(int64_t ng) const { return (ng / G) * sN + (ng % G) * D * sC; }
  __device__ __forceinline__ int64_t p_lo() const { return blockIdx.y * chunk_p; }
  __device__ __forceinline__ int64_t pixels() const { return min(HW, p_lo() + chunk_p) - p_lo(); }
  // Offset of the i-th element of this block's chunk, and its channel within the group.
  // NCHW walks pixels fastest, channels-last channels fastest: both coalesce.
  __device__ __forceinline__ int64_t offset(int64_t i, int64_t L, int64_t& d) const {
    int64_t p;
    if (channels_last) {
      p = i / D;
      d = i - p * D;
    } else {
      d = i / L;
      p = i - d * L;
    }
    return (p_lo() + p) * sP + d * sC;
  }
};

Geometry make_geometry(const GroupNormShape& s) {
  Geometry g;
  g.HW = s.HW;
  g.C = s.C;
  g.D = s.D;
  g.G = s.G;
  g.channels_last = s.channels_last;
  g.sN = s.HW * s.C;
  g.sP = s.channels_last ? s.C : 1;
  g.sC = s.channels_last ? 1 : s.HW;
  g.chunk_p = std::max<int64_t>(std::max<int64_t>(1, kChunkElems / s.D), (s.HW + kMaxChunks - 1) / kMaxChunks);
  g.n_chunks = static_cast<int>((s.HW + g.chunk_p - 1) / g.chunk_p);
  return g;
}

// ---- NCHW fast path -----------------------------------------------------------------------------
// In NCHW a group is one contiguous run of D*HW elements. When HW is a multiple of the 16-byte vector
// width, every vector lies inside one channel, so the kernels read and write 16 bytes per access and
// index with 32-bit flat offsets (the generic kernels' per-element 64-bit division held them to ~40%
// of copy bandwidth on an H100). Same stats layout as the generic path: partial sums shifted by x[base].
template <typename T>
using Pack = VecPack<T, kPack16<T>>;

// s1 += x - pivot, s2 += (x - pivot)^2 over the V elements of a pack.
template <typename T, int V>
__device__ __forceinline__ void add_shifted(const VecPack<T, V>& p, float pivot, float& s1, float& s2) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float v = static_cast<float>(p.v[e]) - pivot;
    s1 += v;
    s2 += v * v;
  }
}

// mean and rstd of a group of `count` values from its sums shifted by `pivot`.
__device__ __forceinline__ void stats_from_shifted(float s1, float s2, float count, float pivot, float eps,
                                                   float& mean, float& rstd) {
  const float m = s1 / count;
  mean = pivot + m;
  rstd = rsqrtf(fmaxf(s2 / count - m * m, 0.f) + eps);
}

// The block's shifted sums, reduced over the block, into this chunk's slot of part.
__device__ __forceinline__ void store_partial_sums(float s1, float s2, float* __restrict__ part, int64_t ng,
                                                   int n_chunks, float* scratch) {
  s1 = block_sum(s1, scratch);
  s2 = block_sum(s2, scratch);
  if (threadIdx.x == 0) {
    part[(ng * n_chunks + blockIdx.y) * 2] = s1;
    part[(ng * n_chunks + blockIdx.y) * 2 + 1] = s2;
  }
}

struct FlatGeometry {
  int len, chunk, n_chunks, HW, G, D;
};

bool use_flat(const GroupNormShape& s, const at::Tensor& x) {
  const int64_t vec = 16 / x.element_size();
  return !s.channels_last && s.HW % vec == 0 && s.D * s.HW < (int64_t{1} << 30) &&
         reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
}

FlatGeometry make_flat_geometry(const GroupNormShape& s, int64_t vec) {
  FlatGeometry g;
  g.len = static_cast<int>(s.D * s.HW);
  const int64_t need = (g.len + kMaxChunks - 1) / kMaxChunks;
  g.chunk = static_cast<int>(std::max<int64_t>(kChunkElems, (need + vec - 1) / vec * vec));
  g.n_chunks = (g.len + g.chunk - 1) / g.chunk;
  g.HW = static_cast<int>(s.HW);
  g.G = static_cast<int>(s.G);
  g.D = static_cast<int>(s.D);
  return g;
}

template <typename T>
__global__ void stats_kernel(const T* __restrict__ x, float* __restrict__ part, FlatGeometry g) {
  constexpr int V = kPack16<T>;
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x;
  const T* xg = x + ng * g.len;
  const float pivot = static_cast<float>(xg[0]);
  const int lo = blockIdx.y * g.chunk, hi = min(g.len, lo + g.chunk);
  float s1 = 0.f, s2 = 0.f;
#pragma unroll 4
  for (int i = lo + threadIdx.x * V; i < hi; i += kThreads * V) {
    add_shifted(*reinterpret_cast<const Pack<T>*>(xg + i), pivot, s1, s2);
  }
  store_partial_sums(s1, s2, part, ng, g.n_chunks, scratch);
}

// The group's mean and rstd from its chunks' shifted partial sums (every block of the group does it).
__device__ __forceinline__ void combine_stats(const float* __restrict__ part, int64_t ng, int n_chunks, float count,
                                              float pivot, float eps, float* scratch, float& mean, float& rstd) {
  float t1 = 0.f, t2 = 0.f;
  for (int j = threadIdx.x; j < n_chunks; j += blockDim.x) {
    t1 += part[(ng * n_chunks + j) * 2];
    t2 += part[(ng * n_chunks + j) * 2 + 1];
  }
  t1 = block_sum(t1, scratch);
  t2 = block_sum(t2, scratch);
  stats_from_shifted(t1, t2, count, pivot, eps, mean, rstd);
}

template <typename T, Activation A>
__global__ void apply_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                  const float* __restrict__ b, const float* __restrict__ part,
                                  float* __restrict__ mean_out, float* __restrict__ rstd_out, FlatGeometry g,
                                  float eps) {
  constexpr int V = kPack16<T>;
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x;
  const T* xg = x + ng * g.len;
  T* yg = y + ng * g.len;
  float mean, rstd;
  combine_stats(part, ng, g.n_chunks, static_cast<float>(g.len), static_cast<float>(xg[0]), eps, scratch, mean, rstd);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  const int c0 = static_cast<int>(ng % g.G) * g.D;
  const int lo = blockIdx.y * g.chunk, hi = min(g.len, lo + g.chunk);
#pragma unroll 4
  for (int i = lo + threadIdx.x * V; i < hi; i += kThreads * V) {
    const int c = c0 + i / g.HW;
    const float a = rstd * w[c], bb = b[c];
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(xg + i);
    Pack<T> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = static_cast<T>(Act<A>::f((static_cast<float>(p.v[j]) - mean) * a + bb));
    *reinterpret_cast<Pack<T>*>(yg + i) = o;
  }
}

// ---- one-pass path (Hopper thread-block clusters) ------------------------------------------------
// Each (sample, group) belongs to a cluster of k CTAs; each CTA keeps its slice of the group in
// shared memory, so x is read from DRAM once: slice -> shared memory + shifted partial sums ->
// the cluster adds its k partials through distributed shared memory -> y from shared memory. The
// two-pass kernels above read x twice (the group has left L2 by the second pass), which caps them
// at 2/3 of copy bandwidth. Needs sm_90; the host falls back to the two-pass kernels elsewhere.
constexpr int kClusterThreads = 512;
constexpr int64_t kSliceBytes = 64 * 1024;      // forward: shared memory per CTA, three CTAs per SM
constexpr int64_t kGradSliceBytes = 48 * 1024;  // backward: per tensor (x and dy), two CTAs per SM
constexpr int kMaxCluster = 8;              // the portable cluster size limit

// Group element i (0 <= i < D*HW) of group `grp` lies at sample_base + offset(i): NCHW is one
// contiguous run; channels-last is HW rows of D contiguous channels, C apart.
struct SliceGeometry {
  int k, slice, len, HW, C, D, G;
  bool channels_last;
  __device__ __forceinline__ int offset(int grp, int i) const {
    return channels_last ? (i / D) * C + grp * D + i % D : grp * D * HW + i;
  }
  // The channel (within the group) of element i; a pack of V elements spans V channels in
  // channels-last and one channel in NCHW (HW is a multiple of V there).
  __device__ __forceinline__ int channel(int i) const { return channels_last ? i % D : i / HW; }
};

// Pack width in elements: 16 bytes when every pack stays inside one channel row, else one element.
int slice_vec(const GroupNormShape& s, const at::Tensor& x, const at::Tensor& dy = {}) {
  const int v = 16 / static_cast<int>(x.element_size());
  const bool aligned = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                       (!dy.defined() || reinterpret_cast<uintptr_t>(dy.const_data_ptr()) % 16 == 0);
  return aligned && (s.channels_last ? s.D % v == 0 : s.HW % v == 0) ? v : 1;
}

// k = 0 when the one-pass path does not apply (pre-Hopper GPU, a group too large for 8 CTAs, or
// 32-bit offsets not enough for one sample).
SliceGeometry make_slice_geometry(const GroupNormShape& s, const at::Tensor& x, int vec, int64_t slice_bytes) {
  SliceGeometry g{};
  int major = 0, sms = 0;
  const int dev = x.get_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t len = s.D * s.HW, esize = x.element_size();
  if (major < 9 || s.C * s.HW >= (int64_t{1} << 31)) return g;
  int k = 1;
  while (k <= kMaxCluster && ((len + k - 1) / k) * esize > slice_bytes) k *= 2;
  if (k > kMaxCluster) return g;
  // Small batches: split groups further so that the grid still covers the GPU twice.
  while (k < kMaxCluster && s.N * s.G * k < 2 * sms && len / (2 * k) >= 4096) k *= 2;
  g.k = k;
  g.slice = static_cast<int>(((len + k - 1) / k + vec - 1) / vec * vec);
  g.len = static_cast<int>(len);
  g.HW = static_cast<int>(s.HW);
  g.C = static_cast<int>(s.C);
  g.D = static_cast<int>(s.D);
  g.G = static_cast<int>(s.G);
  g.channels_last = s.channels_last;
  return g;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// (a, b) summed over the CTA and then over the cluster (through distributed shared memory); the
// result is valid in every thread of every CTA of the cluster.
__device__ __forceinline__ void cluster_sum2(cooperative_groups::cluster_group& cluster, float& a, float& b,
                                             float* scratch) {
  __shared__ float partial[2];
  __shared__ float total[2];
  a = block_sum(a, scratch);
  b = block_sum(b, scratch);
  if (threadIdx.x == 0) partial[0] = a, partial[1] = b;
  cluster.sync();  // every CTA's partial is written
  if (threadIdx.x < kWarp) {
    float t1 = 0.f, t2 = 0.f;
    if (threadIdx.x < cluster.num_blocks()) {
      const float* remote = cluster.map_shared_rank(partial, threadIdx.x);
      t1 = remote[0];
      t2 = remote[1];
    }
    t1 = warp_sum(t1);
    t2 = warp_sum(t2);
    if (threadIdx.x == 0) total[0] = t1, total[1] = t2;
  }
  cluster.sync();  // the partials have been read (a CTA may now exit) and total[] is visible
  a = total[0];
  b = total[1];
}
#endif

template <typename T, int V, Activation A>
__global__ void __launch_bounds__(kClusterThreads)
    cluster_forward_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                           const float* __restrict__ b, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                           SliceGeometry g, float eps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using P = VecPack<T, V>;
  extern __shared__ __align__(16) unsigned char smem[];
  P* cache = reinterpret_cast<P*>(smem);
  __shared__ float scratch[kClusterThreads / kWarp];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t ng = blockIdx.x / g.k;
  const int grp = static_cast<int>(ng % g.G);
  const int64_t sample = (ng / g.G) * static_cast<int64_t>(g.C) * g.HW;
  const T* xs = x + sample;
  T* ys = y + sample;
  const int lo = rank * g.slice, hi = min(g.len, lo + g.slice);
  const int packs = max(0, (hi - lo) / V);
  const float pivot = static_cast<float>(xs[g.offset(grp, 0)]);

  float s1 = 0.f, s2 = 0.f;
#pragma unroll 4
  for (int j = threadIdx.x; j < packs; j += kClusterThreads) {
    const P p = *reinterpret_cast<const P*>(xs + g.offset(grp, lo + j * V));
    cache[j] = p;
    add_shifted(p, pivot, s1, s2);
  }
  cluster_sum2(cluster, s1, s2, scratch);
  float mean, rstd;
  stats_from_shifted(s1, s2, static_cast<float>(g.len), pivot, eps, mean, rstd);
  if (rank == 0 && threadIdx.x == 0) mean_out[ng] = mean, rstd_out[ng] = rstd;
  const int c0 = grp * g.D;
#pragma unroll 4
  for (int j = threadIdx.x; j < packs; j += kClusterThreads) {
    const int i = lo + j * V;
    const P p = cache[j];
    P o;
    const int d = g.channel(i);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = c0 + (g.channels_last ? d + e : d);
      o.v[e] = static_cast<T>(Act<A>::f((static_cast<float>(p.v[e]) - mean) * (rstd * w[c]) + b[c]));
    }
    *reinterpret_cast<P*>(ys + g.offset(grp, i)) = o;
  }
#endif
}

// Launches `kernel` on `ctas` CTAs of kClusterThreads in clusters of k with `smem` bytes of dynamic
// shared memory; `smem_allowed` (one per kernel instance) remembers how far its limit was raised.
template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), int64_t ctas, int k, size_t smem, size_t& smem_allowed,
                     Args... args) {
  if (smem > smem_allowed) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    smem_allowed = smem;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas));
  cfg.blockDim = dim3(kClusterThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = k;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

template <typename T, int V, Activation A>
void launch_cluster_forward(const ForwardCall& c, const at::Tensor& w, const at::Tensor& b, const SliceGeometry& g,
                            double eps) {
  static size_t smem_allowed = 0;
  const size_t smem = static_cast<size_t>(g.slice / V) * sizeof(VecPack<T, V>);
  launch_clusters(&cluster_forward_kernel<T, V, A>, c.s.N * c.s.G * g.k, g.k, smem, smem_allowed,
                  c.x.const_data_ptr<T>(), c.y.mutable_data_ptr<T>(), w.const_data_ptr<float>(),
                  b.const_data_ptr<float>(), c.mean.mutable_data_ptr<float>(), c.rstd.mutable_data_ptr<float>(), g,
                  static_cast<float>(eps));
}

void cluster_forward(const ForwardCall& c, const at::Tensor& w, const at::Tensor& b, const SliceGeometry& g, int vec,
                     double eps) {
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu_cuda", [&] {
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      if (vec == 1) {
        launch_cluster_forward<scalar_t, 1, A>(c, w, b, g, eps);
      } else {
        launch_cluster_forward<scalar_t, kPack16<scalar_t>, A>(c, w, b, g, eps);
      }
    });
  });
}

// One-pass backward on the same clusters: x and dy of the CTA's slice go to shared memory while the
// CTA sums, per channel, du * (x - mean) and du (for dweight/dbias) and, over the group,
// w_c du and w_c du (x - mean) (for dx); the cluster adds the group sums; dx from shared memory.
// part[cta, d] = (rstd * sum du (x - mean), sum du) for channel d of the CTA's group: summed over
// the clusters' CTAs and the batch by the host, so dweight and dbias are deterministic.
template <typename T, int V, Activation A>
__global__ void __launch_bounds__(kClusterThreads)
    cluster_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                            const float* __restrict__ w, const float* __restrict__ b,
                            const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                            float* __restrict__ part, SliceGeometry g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using P = VecPack<T, V>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int max_packs = g.slice / V;
  P* cache_x = reinterpret_cast<P*>(smem);
  P* cache_dy = cache_x + max_packs;
  float* acc = reinterpret_cast<float*>(cache_dy + max_packs);  // [2, D]: sum du (x - mean), sum du
  __shared__ float scratch[kClusterThreads / kWarp];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t ng = blockIdx.x / g.k;
  const int grp = static_cast<int>(ng % g.G), c0 = grp * g.D;
  const int64_t sample = (ng / g.G) * static_cast<int64_t>(g.C) * g.HW;
  const int lo = rank * g.slice, hi = min(g.len, lo + g.slice);
  const int packs = max(0, (hi - lo) / V);
  const float mean = mean_in[ng], rstd = rstd_in[ng];
  const int lane = threadIdx.x % kWarp;
  for (int d = threadIdx.x; d < 2 * g.D; d += kClusterThreads) acc[d] = 0.f;
  __syncthreads();

  // Channels-last: pack j holds channels ((lo / V + j) % q) * V .. + V - 1 of a pixel (q = D / V
  // packs per pixel), the same for every pack of a thread when q divides the block size (the host
  // checks), so each thread keeps its V channels' sums in registers. NCHW: a pack is one channel;
  // the warp adds its 32 packs' sums together when they share it (always, unless a warp straddles
  // two channels).
  float cs[V], cb[V];
#pragma unroll
  for (int e = 0; e < V; ++e) cs[e] = cb[e] = 0.f;
  float sa = 0.f, sb = 0.f;  // group sums of w_c du and w_c du (x - mean)
  for (int base = 0; base < packs; base += kClusterThreads) {
    const int j = base + threadIdx.x;
    const bool valid = j < packs;
    const int i = lo + j * V;
    float ps = 0.f, pb = 0.f;  // NCHW: this pack's channel sums
    int d = 0;
    if (valid) {
      const int off = g.offset(grp, i);
      const P px = *reinterpret_cast<const P*>(x + sample + off);
      const P pdy = *reinterpret_cast<const P*>(dy + sample + off);
      cache_x[j] = px;
      cache_dy[j] = pdy;
      d = g.channel(i);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int c = c0 + (g.channels_last ? d + e : d);
        const float xc = static_cast<float>(px.v[e]) - mean, wc = w[c];
        const float du = static_cast<float>(pdy.v[e]) * Act<A>::df(xc * (rstd * wc) + b[c]);
        sa += wc * du;
        sb += wc * du * xc;
        if (g.channels_last) {
          cs[e] += du * xc;
          cb[e] += du;
        } else {
          ps += du * xc;
          pb += du;
        }
      }
    }
    if (!g.channels_last) {
      const unsigned active = __ballot_sync(0xffffffffu, valid);
      const int d0 = __shfl_sync(0xffffffffu, d, 0);
      if (active != 0u && __all_sync(0xffffffffu, !valid || d == d0)) {
        ps = warp_sum(ps);
        pb = warp_sum(pb);
        if (lane == 0) atomicAdd(&acc[d0], ps), atomicAdd(&acc[g.D + d0], pb);
      } else if (valid) {
        atomicAdd(&acc[d], ps);
        atomicAdd(&acc[g.D + d], pb);
      }
    }
  }
  if (g.channels_last && packs > 0) {
    // lanes l and l ^ o hold the same channels when q divides o
    const int q = g.D / V;
    const int d = (lo + threadIdx.x * V) % g.D;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      for (int o = kWarp / 2; o >= q; o >>= 1) {
        cs[e] += __shfl_xor_sync(0xffffffffu, cs[e], o);
        cb[e] += __shfl_xor_sync(0xffffffffu, cb[e], o);
      }
      if (lane < q || q >= kWarp) {
        atomicAdd(&acc[d + e], cs[e]);
        atomicAdd(&acc[g.D + d + e], cb[e]);
      }
    }
  }
  cluster_sum2(cluster, sa, sb, scratch);  // also orders the shared-memory atomics before the reads below
  float* out = part + blockIdx.x * static_cast<int64_t>(2 * g.D);
  for (int d = threadIdx.x; d < g.D; d += kClusterThreads) out[2 * d] = rstd * acc[d], out[2 * d + 1] = acc[g.D + d];

  // dx = rstd w_c du - rstd A - rstd^2 B (x - mean),  A = sa / M,  B = rstd sb / M
  const float inv_m = 1.f / static_cast<float>(g.len);
  const float k2 = -rstd * rstd * rstd * sb * inv_m, k3 = -rstd * sa * inv_m;
  T* dxs = dx + sample;
  for (int j = threadIdx.x; j < packs; j += kClusterThreads) {
    const int i = lo + j * V;
    const P px = cache_x[j], pdy = cache_dy[j];
    const int d = g.channel(i);
    P o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = c0 + (g.channels_last ? d + e : d);
      const float xc = static_cast<float>(px.v[e]) - mean, a = rstd * w[c];
      const float du = static_cast<float>(pdy.v[e]) * Act<A>::df(xc * a + b[c]);
      o.v[e] = static_cast<T>(a * du + k2 * xc + k3);
    }
    *reinterpret_cast<P*>(dxs + g.offset(grp, i)) = o;
  }
#endif
}

// The backward's cluster geometry, or k = 0 where it does not apply; channels-last also needs the
// packs of a pixel row (D / V) to divide the block size (see the kernel).
SliceGeometry make_grad_slice_geometry(const GroupNormShape& s, const at::Tensor& x, int vec) {
  SliceGeometry g = make_slice_geometry(s, x, vec, kGradSliceBytes);
  if (s.channels_last && kClusterThreads % (s.D / vec) != 0) g.k = 0;
  return g;
}

template <typename T, int V, Activation A>
void launch_cluster_backward(const BackwardCall& c, const at::Tensor& w, const at::Tensor& b, const SliceGeometry& g,
                             at::Tensor& part) {
  static size_t smem_allowed = 0;
  const size_t smem = 2 * static_cast<size_t>(g.slice / V) * sizeof(VecPack<T, V>) + 2 * g.D * sizeof(float);
  launch_clusters(&cluster_backward_kernel<T, V, A>, c.s.N * c.s.G * g.k, g.k, smem, smem_allowed,
                  c.dy.const_data_ptr<T>(), c.x.const_data_ptr<T>(), c.dx.mutable_data_ptr<T>(),
                  w.const_data_ptr<float>(), b.const_data_ptr<float>(), c.mean.const_data_ptr<float>(),
                  c.rstd.const_data_ptr<float>(), part.mutable_data_ptr<float>(), g);
}

// dx, and (dweight, dbias) as float32 [C] each.
std::tuple<at::Tensor, at::Tensor> cluster_backward(const BackwardCall& c, const at::Tensor& w, const at::Tensor& b,
                                                    const SliceGeometry& g, int vec) {
  const GroupNormShape& s = c.s;
  at::Tensor part = at::empty({s.N, s.G, g.k, s.D, 2}, c.x.options().dtype(at::kFloat));
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu_backward_cuda", [&] {
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      if (vec == 1) {
        launch_cluster_backward<scalar_t, 1, A>(c, w, b, g, part);
      } else {
        launch_cluster_backward<scalar_t, kPack16<scalar_t>, A>(c, w, b, g, part);
      }
    });
  });
  const at::Tensor sums = part.sum(at::IntArrayRef{0, 2}).view({s.C, 2});
  return {sums.select(1, 0), sums.select(1, 1)};
}

// ---- generic path (any layout, any HW) --------------------------------------------------------------
template <typename T>
__global__ void stats_kernel(const T* __restrict__ x, float* __restrict__ part, Geometry g) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x, base = g.base(ng), L = g.pixels();
  const float pivot = static_cast<float>(x[base]);
  float s1 = 0.f, s2 = 0.f;
  for (int64_t i = threadIdx.x; i < L * g.D; i += blockDim.x) {
    int64_t d;
    const float v = static_cast<float>(x[base + g.offset(i, L, d)]) - pivot;
    s1 += v;
    s2 += v * v;
  }
  store_partial_sums(s1, s2, part, ng, g.n_chunks, scratch);
}

template <typename T, Activation A>
__global__ void apply_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                             const float* __restrict__ b, const float* __restrict__ part,
                             float* __restrict__ mean_out, float* __restrict__ rstd_out, Geometry g, float eps) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x, base = g.base(ng), L = g.pixels(), c0 = (ng % g.G) * g.D;
  float mean, rstd;
  combine_stats(part, ng, g.n_chunks, static_cast<float>(g.HW * g.D), static_cast<float>(x[base]), eps, scratch,
                mean, rstd);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  for (int64_t i = threadIdx.x; i < L * g.D; i += blockDim.x) {
    int64_t d;
    const int64_t off = base + g.offset(i, L, d);
    const float u = (static_cast<float>(x[off]) - mean) * rstd * w[c0 + d] + b[c0 + d];
    y[off] = static_cast<T>(Act<A>::f(u));
  }
}

// part[n, k, c] = (sum du * (x - mean), sum du) over chunk k, du = dy * act'(u).
template <typename T, Activation A>
__global__ void grad_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                 const float* __restrict__ b, const float* __restrict__ mean_in,
                                 const float* __restrict__ rstd_in, float* __restrict__ part, Geometry g) {
  extern __shared__ float acc[];  // channels-last: 2 * D per-channel accumulators
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x, n = ng / g.G, base = g.base(ng), L = g.pixels(), c0 = (ng % g.G) * g.D;
  const float mean = mean_in[ng], rstd = rstd_in[ng];
  float* out = part + ((n * g.n_chunks + blockIdx.y) * g.C + c0) * 2;
  if (!g.channels_last) {
    // one channel at a time: its pixels are contiguous
    for (int64_t d = 0; d < g.D; ++d) {
      const float a = rstd * w[c0 + d], bb = b[c0 + d];
      float s1 = 0.f, s2 = 0.f;
      for (int64_t p = threadIdx.x; p < L; p += blockDim.x) {
        const int64_t off = base + (g.p_lo() + p) * g.sP + d * g.sC;
        const float xc = static_cast<float>(x[off]) - mean;
        const float du = static_cast<float>(dy[off]) * Act<A>::df(xc * a + bb);
        s1 += du * xc;
        s2 += du;
      }
      s1 = block_sum(s1, scratch);
      s2 = block_sum(s2, scratch);
      if (threadIdx.x == 0) out[2 * d] = s1, out[2 * d + 1] = s2;
    }
    return;
  }
  for (int64_t j = threadIdx.x; j < 2 * g.D; j += blockDim.x) acc[j] = 0.f;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < L * g.D; i += blockDim.x) {
    int64_t d;
    const int64_t off = base + g.offset(i, L, d);
    const float xc = static_cast<float>(x[off]) - mean;
    const float du = static_cast<float>(dy[off]) * Act<A>::df(xc * rstd * w[c0 + d] + b[c0 + d]);
    atomicAdd(&acc[d], du * xc);
    atomicAdd(&acc[g.D + d], du);
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < g.D; d += blockDim.x) out[2 * d] = acc[d], out[2 * d + 1] = acc[g.D + d];
}

// dx = k1 * du + k2 * (x - mean) + k3, coef[n, c] = (k1, k2, k3).
template <typename T, Activation A>
__global__ void grad_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                  const float* __restrict__ w, const float* __restrict__ b,
                                  const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                  const float* __restrict__ coef, Geometry g) {
  const int64_t ng = blockIdx.x, n = ng / g.G, base = g.base(ng), L = g.pixels(), c0 = (ng % g.G) * g.D;
  const float mean = mean_in[ng], rstd = rstd_in[ng];
  for (int64_t i = threadIdx.x; i < L * g.D; i += blockDim.x) {
    int64_t d;
    const int64_t off = base + g.offset(i, L, d);
    const float* k = coef + (n * g.C + c0 + d) * 3;
    const float xc = static_cast<float>(x[off]) - mean;
    const float du = static_cast<float>(dy[off]) * Act<A>::df(xc * rstd * w[c0 + d] + b[c0 + d]);
    dx[off] = static_cast<T>(k[0] * du + k[1] * xc + k[2]);
  }
}

// stats then apply; the kernels are overloaded on the geometry (FlatGeometry: the NCHW fast path).
template <typename Geo>
void launch_forward(const ForwardCall& c, const at::Tensor& w, const at::Tensor& b, const Geo& geo, double eps) {
  at::Tensor part = at::empty({c.s.N * c.s.G, geo.n_chunks, 2}, c.x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(c.s.N * c.s.G), geo.n_chunks);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu_cuda", [&] {
    stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(c.x.const_data_ptr<scalar_t>(),
                                                          part.mutable_data_ptr<float>(), geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      apply_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(
          c.x.const_data_ptr<scalar_t>(), c.y.mutable_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
          b.const_data_ptr<float>(), part.const_data_ptr<float>(), c.mean.mutable_data_ptr<float>(),
          c.rstd.mutable_data_ptr<float>(), geo, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  ForwardCall c = prepare_forward(x_in, weight, bias, num_groups, eps, activation);
  if (c.x.numel() == 0) return {c.y, c.mean, c.rstd};
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  const int vec = slice_vec(c.s, c.x);
  const SliceGeometry sg = make_slice_geometry(c.s, c.x, vec, kSliceBytes);
  if (sg.k > 0) {
    cluster_forward(c, w, b, sg, vec, eps);
  } else if (use_flat(c.s, c.x)) {
    launch_forward(c, w, b, make_flat_geometry(c.s, 16 / c.x.element_size()), eps);
  } else {
    launch_forward(c, w, b, make_geometry(c.s), eps);
  }
  return {c.y, c.mean, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    int64_t num_groups, c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  BackwardCall c = prepare_backward(grad_y, x_in, weight, bias, mean_in, rstd_in, num_groups, activation);
  const GroupNormShape& s = c.s;
  const auto opts = c.x.options();
  if (c.x.numel() == 0) {
    return {c.dx, at::zeros({s.C}, opts.dtype(c.weight_grad_dtype)), at::zeros({s.C}, opts.dtype(c.bias_grad_dtype))};
  }
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  const int vec = slice_vec(s, c.x, c.dy);
  const SliceGeometry sg = make_grad_slice_geometry(s, c.x, vec);
  if (sg.k > 0) {
    auto [dw, db] = cluster_backward(c, w, b, sg, vec);
    // copies: two views of one buffer would alias (and be strided), which the schema forbids
    return {c.dx, dw.to(c.weight_grad_dtype, false, true, at::MemoryFormat::Contiguous),
            db.to(c.bias_grad_dtype, false, true, at::MemoryFormat::Contiguous)};
  }
  const Geometry geo = make_geometry(s);
  at::Tensor part = at::empty({s.N, geo.n_chunks, s.C, 2}, opts.dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(s.N * s.G), geo.n_chunks);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t shmem = s.channels_last ? 2 * s.D * sizeof(float) : 0;
  TORCH_CHECK(shmem <= 48 * 1024, "group_norm_silu_backward: too many channels per group (", s.D,
              ") for the channels-last CUDA kernel; use the triton backend");
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu_backward_cuda", [&] {
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      grad_sums_kernel<scalar_t, A><<<grid, kThreads, shmem, stream>>>(
          c.dy.const_data_ptr<scalar_t>(), c.x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
          b.const_data_ptr<float>(), c.mean.const_data_ptr<float>(), c.rstd.const_data_ptr<float>(),
          part.mutable_data_ptr<float>(), geo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // The [N, C]-sized algebra between the two passes (see csrc/group_norm_silu.h).
  const at::Tensor sums = part.sum(1);
  const at::Tensor dsc = sums.select(-1, 0), dbs = sums.select(-1, 1);
  const at::Tensor r = c.rstd.repeat_interleave(s.D, 1);
  const double M = static_cast<double>(s.D * s.HW);
  const at::Tensor mean_wdu = (w * dbs).view({s.N, s.G, s.D}).sum(-1, true) / M;
  const at::Tensor mean_wdu_xhat = (w * r * dsc).view({s.N, s.G, s.D}).sum(-1, true) / M;
  const at::Tensor rg = c.rstd.unsqueeze(-1);
  const at::Tensor coef = at::stack({(r * w).view({s.N, s.G, s.D}), (-rg * rg * mean_wdu_xhat).expand({s.N, s.G, s.D}),
                                     (-rg * mean_wdu).expand({s.N, s.G, s.D})}, -1)
                              .reshape({s.N, s.C, 3})
                              .contiguous();
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu_backward_cuda", [&] {
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      grad_apply_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(
          c.dy.const_data_ptr<scalar_t>(), c.x.const_data_ptr<scalar_t>(), c.dx.mutable_data_ptr<scalar_t>(),
          w.const_data_ptr<float>(), b.const_data_ptr<float>(), c.mean.const_data_ptr<float>(),
          c.rstd.const_data_ptr<float>(), coef.const_data_ptr<float>(), geo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {c.dx, (r * dsc).sum(0).to(c.weight_grad_dtype), dbs.sum(0).to(c.bias_grad_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward);
}

}  // namespace genkern::cuda
