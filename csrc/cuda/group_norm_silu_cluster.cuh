// group_norm_silu's one-pass path on Hopper thread-block clusters (sm_90), included by
// csrc/cuda/group_norm_silu.cu (the shipped kernels) and by scripts/gpu_candidates (the same kernels
// built with other launch bounds and timed against these). Everything sits in an anonymous namespace,
// so that each library including it has kernels of its own.
//
// Each (sample, group) belongs to a cluster of k CTAs; each CTA keeps its slice of the group in
// shared memory, so x is read from DRAM once: slice -> shared memory + shifted partial sums ->
// the cluster adds its k partials through distributed shared memory -> y from shared memory. The
// two-pass kernels (group_norm_silu.cu) read x twice (the group has left L2 by the second pass),
// which caps them at 2/3 of copy bandwidth. Needs sm_90; the host falls back to the two-pass kernels
// elsewhere. param_grads (dweight, dbias from per-channel partial sums) serves both paths.

#pragma once
#include <cooperative_groups.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "activation.h"
#include "cuda/block_reduce.cuh"
#include "cuda/vec_pack.cuh"
#include "dispatch.h"
#include "group_norm_silu.h"

namespace genkern::cuda {
namespace {

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

constexpr int kClusterThreads = 512;
constexpr int64_t kSliceBytes = 64 * 1024;      // forward: shared memory per CTA, room for three CTAs per SM
constexpr int64_t kGradSliceBytes = 48 * 1024;  // backward: per tensor (x and dy); two CTAs per SM at most
                                                // at full slices, three below ~37 KB
constexpr int kMaxCluster = 8;              // the portable cluster size limit

// Group element i (0 <= i < D*HW) of group `grp` lies at sample_base + offset(i): NCHW is one
// contiguous run; channels-last is HW rows of D contiguous channels, C apart.
// The kernels take the layout as a template argument (CL): a runtime flag kept both layouts' code and
// registers live in one kernel (the backward's per-lane channel sums of channels-last among them).
struct SliceGeometry {
  int k, slice, len, HW, C, D, G;
  bool channels_last;
  template <bool CL>
  __device__ __forceinline__ int offset(int grp, int i) const {
    if constexpr (CL) {
      return (i / D) * C + grp * D + i % D;
    } else {
      return grp * D * HW + i;
    }
  }
  // The channel (within the group) of element i; a pack of V elements spans V channels in
  // channels-last and one channel in NCHW (HW is a multiple of V there).
  template <bool CL>
  __device__ __forceinline__ int channel(int i) const {
    if constexpr (CL) {
      return i % D;
    } else {
      return i / HW;
    }
  }
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

template <typename T, int V, Activation A, bool CL, int MinBlocks>
__global__ void __launch_bounds__(kClusterThreads, MinBlocks)
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
  const float pivot = static_cast<float>(xs[g.offset<CL>(grp, 0)]);

  float s1 = 0.f, s2 = 0.f;
#pragma unroll 4
  for (int j = threadIdx.x; j < packs; j += kClusterThreads) {
    const P p = *reinterpret_cast<const P*>(xs + g.offset<CL>(grp, lo + j * V));
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
    const int d = g.channel<CL>(i);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = c0 + (CL ? d + e : d);
      o.v[e] = static_cast<T>(Act<A>::f((static_cast<float>(p.v[e]) - mean) * (rstd * w[c]) + b[c]));
    }
    *reinterpret_cast<P*>(ys + g.offset<CL>(grp, i)) = o;
  }
#endif
}

// A kernel's limit of dynamic shared memory (cudaFuncAttributeMaxDynamicSharedMemorySize), raised on
// first need past the default 48 KB. The attribute belongs to the function in one device's context, so
// the high-water mark is kept per device; it is only ever raised, under a lock, because lowering it
// while another host thread launches the same kernel with more would fail that launch.
class DynamicSmemLimit {
 public:
  void ensure(const void* kernel, size_t smem) {
    const int dev = c10::cuda::current_device();  // the op's CUDAGuard made it x's device
    TORCH_CHECK(dev >= 0 && dev < C10_COMPILE_TIME_MAX_GPUS, "group_norm_silu: bad CUDA device index ", dev);
    if (smem <= allowed_[dev].load(std::memory_order_acquire)) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    if (smem <= allowed_[dev].load(std::memory_order_relaxed)) return;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    allowed_[dev].store(smem, std::memory_order_release);
  }

 private:
  std::array<std::atomic<size_t>, C10_COMPILE_TIME_MAX_GPUS> allowed_{};
  std::mutex mutex_;
};

// Launches `kernel` on `ctas` CTAs of kClusterThreads in clusters of k with `smem` bytes of dynamic
// shared memory; `limit` is the kernel's own (one per kernel instance).
template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), int64_t ctas, int k, size_t smem, DynamicSmemLimit& limit,
                     Args... args) {
  limit.ensure(reinterpret_cast<const void*>(kernel), smem);
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

// Calls fn(TypeTag<T>, integral_constant V, ActivationConstant A, bool_constant CL) for the
// call's element type, pack width (16 bytes, or one element), activation and layout.
template <typename Fn>
void dispatch_cluster(at::ScalarType dtype, Activation act, int vec, bool channels_last, Fn&& fn) {
  GENKERN_DISPATCH_FLOAT_TYPES(dtype, "group_norm_silu_cuda", [&] {
    dispatch_activation(act, [&](auto a) {
      const auto with_layout = [&](auto cl) {
        if (vec == 1) {
          fn(TypeTag<scalar_t>{}, std::integral_constant<int, 1>{}, a, cl);
        } else {
          fn(TypeTag<scalar_t>{}, std::integral_constant<int, kPack16<scalar_t>>{}, a, cl);
        }
      };
      if (channels_last) {
        with_layout(std::true_type{});
      } else {
        with_layout(std::false_type{});
      }
    });
  });
}

// MinBlocks: the kernels' minimum of resident CTAs per SM, for __launch_bounds__ (group_norm_silu.cu:
// kClusterMinBlocks says which the shipped kernels take and why).
template <int MinBlocks>
void cluster_forward(const ForwardCall& c, const at::Tensor& w, const at::Tensor& b, const SliceGeometry& g, int vec,
                     double eps) {
  dispatch_cluster(c.x.scalar_type(), c.act, vec, g.channels_last, [&](auto t, auto v, auto a, auto cl) {
    using T = typename decltype(t)::type;
    constexpr int V = decltype(v)::value;
    static DynamicSmemLimit smem_limit;  // one per kernel instance
    const size_t smem = static_cast<size_t>(g.slice / V) * sizeof(VecPack<T, V>);
    launch_clusters(&cluster_forward_kernel<T, V, decltype(a)::value, decltype(cl)::value, MinBlocks>,
                    c.s.N * c.s.G * g.k, g.k, smem, smem_limit, c.x.const_data_ptr<T>(), c.y.mutable_data_ptr<T>(),
                    w.const_data_ptr<float>(), b.const_data_ptr<float>(), c.mean.mutable_data_ptr<float>(),
                    c.rstd.mutable_data_ptr<float>(), g, static_cast<float>(eps));
  });
}

// One-pass backward on the same clusters: x and dy of the CTA's slice go to shared memory while the
// CTA sums, per channel, du * (x - mean) and du (for dweight/dbias) and, over the group,
// w_c du and w_c du (x - mean) (for dx); the cluster adds the group sums; dx from shared memory.
// part[cta, d] = (rstd * sum du (x - mean), sum du) for channel d of the CTA's group: summed over
// the clusters' CTAs and the batch by param_grads_kernel in a fixed order. Within a CTA the warps add
// their channel sums into shared memory with atomics, in the order they get there, so dweight and
// dbias may differ in their last bits from run to run (dx, mean and rstd do not).
template <typename T, int V, Activation A, bool CL, int MinBlocks>
__global__ void __launch_bounds__(kClusterThreads, MinBlocks)
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
      const int off = g.offset<CL>(grp, i);
      const P px = *reinterpret_cast<const P*>(x + sample + off);
      const P pdy = *reinterpret_cast<const P*>(dy + sample + off);
      cache_x[j] = px;
      cache_dy[j] = pdy;
      d = g.channel<CL>(i);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int c = c0 + (CL ? d + e : d);
        const float xc = static_cast<float>(px.v[e]) - mean, wc = w[c];
        const float du = static_cast<float>(pdy.v[e]) * Act<A>::df(xc * (rstd * wc) + b[c]);
        sa += wc * du;
        sb += wc * du * xc;
        if constexpr (CL) {
          cs[e] += du * xc;
          cb[e] += du;
        } else {
          ps += du * xc;
          pb += du;
        }
      }
    }
    if constexpr (!CL) {
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
  if (CL && packs > 0) {
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
    const int d = g.channel<CL>(i);
    P o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = c0 + (CL ? d + e : d);
      const float xc = static_cast<float>(px.v[e]) - mean, a = rstd * w[c];
      const float du = static_cast<float>(pdy.v[e]) * Act<A>::df(xc * a + b[c]);
      o.v[e] = static_cast<T>(a * du + k2 * xc + k3);
    }
    *reinterpret_cast<P*>(dxs + g.offset<CL>(grp, i)) = o;
  }
#endif
}

// The backward's cluster geometry, or k = 0 where it does not apply; channels-last also needs the
// packs of a pixel row (D / V) to divide the block size (see the kernel). slice_bytes: per tensor.
SliceGeometry make_grad_slice_geometry(const GroupNormShape& s, const at::Tensor& x, int vec,
                                       int64_t slice_bytes = kGradSliceBytes) {
  SliceGeometry g = make_slice_geometry(s, x, vec, slice_bytes);
  if (s.channels_last && kClusterThreads % (s.D / vec) != 0) g.k = 0;
  return g;
}

// dweight and dbias from the backward's partial sums part[N, G, k, D, 2], written in the parameters'
// dtypes: one launch where an ATen sum and two dtype copies took three. A block holds kParamChannels
// channels (threadIdx.x) by kParamRows row slices (threadIdx.y): slice y sums rows y, y + kParamRows, ...
// of the N k rows in double, then the slices are added in a fixed tree, so the result does not depend on
// scheduling (deterministic). One thread per channel walking all N k rows was latency-bound: each row's
// load waits for the one before (256 rows at 32x512x64x64, k = 8).
constexpr int kParamChannels = 32, kParamRows = 16;

template <typename W, typename B>
__global__ void __launch_bounds__(kParamChannels * kParamRows)
    param_grads_kernel(const float* __restrict__ part, W* __restrict__ dw, B* __restrict__ db, int64_t N, int G,
                       int k, int D) {
  __shared__ double sums[2][kParamRows][kParamChannels];
  const int x = threadIdx.x, y = threadIdx.y;
  const int c = blockIdx.x * kParamChannels + x;
  const bool valid = c < G * D;
  double sw = 0.0, sb = 0.0;
  if (valid) {
    const int grp = c / D, d = c % D;
    for (int64_t j = y; j < N * k; j += kParamRows) {  // row j = (n, r): part[n, grp, r, d, :]
      const int64_t n = j / k;
      const float* p = part + (((n * G + grp) * k + (j - n * k)) * D + d) * 2;
      sw += p[0];
      sb += p[1];
    }
  }
  sums[0][y][x] = sw;
  sums[1][y][x] = sb;
  __syncthreads();
#pragma unroll
  for (int o = kParamRows / 2; o > 0; o >>= 1) {
    if (y < o) {
      sums[0][y][x] += sums[0][y + o][x];
      sums[1][y][x] += sums[1][y + o][x];
    }
    __syncthreads();
  }
  if (y == 0 && valid) {
    dw[c] = static_cast<W>(static_cast<float>(sums[0][0][x]));
    db[c] = static_cast<B>(static_cast<float>(sums[1][0][x]));
  }
}

// (dweight, dbias) as [C] each in the given dtypes from part[N, G, k, D, 2]; also the two-pass backward's.
std::tuple<at::Tensor, at::Tensor> param_grads(const at::Tensor& part, const GroupNormShape& s, int k,
                                               at::ScalarType weight_dtype, at::ScalarType bias_dtype) {
  at::Tensor dw = at::empty({s.C}, part.options().dtype(weight_dtype));
  at::Tensor db = at::empty({s.C}, part.options().dtype(bias_dtype));
  const unsigned blocks = static_cast<unsigned>((s.C + kParamChannels - 1) / kParamChannels);
  GENKERN_DISPATCH_FLOAT_TYPES(weight_dtype, "group_norm_silu_backward_cuda", [&] {
    using W = scalar_t;
    GENKERN_DISPATCH_FLOAT_TYPES(bias_dtype, "group_norm_silu_backward_cuda", [&] {
      param_grads_kernel<W, scalar_t><<<blocks, dim3(kParamChannels, kParamRows), 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
          part.const_data_ptr<float>(), dw.mutable_data_ptr<W>(), db.mutable_data_ptr<scalar_t>(), s.N,
          static_cast<int>(s.G), k, static_cast<int>(s.D));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dw, db};
}

// Writes c.dx; returns (dweight, dbias) as [C] each, in the parameters' dtypes.
template <int MinBlocks>
std::tuple<at::Tensor, at::Tensor> cluster_backward(const BackwardCall& c, const at::Tensor& w, const at::Tensor& b,
                                                    const SliceGeometry& g, int vec) {
  const GroupNormShape& s = c.s;
  at::Tensor part = at::empty({s.N, s.G, g.k, s.D, 2}, c.x.options().dtype(at::kFloat));
  dispatch_cluster(c.x.scalar_type(), c.act, vec, g.channels_last, [&](auto t, auto v, auto a, auto cl) {
    using T = typename decltype(t)::type;
    constexpr int V = decltype(v)::value;
    static DynamicSmemLimit smem_limit;  // one per kernel instance
    const size_t smem = 2 * static_cast<size_t>(g.slice / V) * sizeof(VecPack<T, V>) + 2 * g.D * sizeof(float);
    launch_clusters(&cluster_backward_kernel<T, V, decltype(a)::value, decltype(cl)::value, MinBlocks>,
                    c.s.N * c.s.G * g.k, g.k, smem, smem_limit, c.dy.const_data_ptr<T>(), c.x.const_data_ptr<T>(),
                    c.dx.mutable_data_ptr<T>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                    c.mean.const_data_ptr<float>(), c.rstd.const_data_ptr<float>(), part.mutable_data_ptr<float>(), g);
  });
  return param_grads(part, s, g.k, c.weight_grad_dtype, c.bias_grad_dtype);
}

}  // namespace
}  // namespace genkern::cuda
