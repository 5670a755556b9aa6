// CUDA implementation of invdiff::guided_step. Memory-bound: each thread moves VEC elements of
// every input per iteration in 16-byte accesses (float4, or 8 halves / bfloat16s), does the
// update in fp32 and writes VEC elements. The state (x, noise, out: TS) may be fp32 while the
// model outputs (eps_*, g_*: TM) are 16-bit; VEC is then set by the narrower type (8), so a
// thread reads one 16-byte pack of each model output and two of each fp32 state tensor. Rows
// whose size or pointers do not allow 16-byte accesses take the scalar kernel (VEC = 1).
// Plain CUDA plus guided_step.h: the stream comes from the caller, so this file compiles with
// nvcc alone (`make check-cuda`).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "guided_step.h"

namespace invdiff {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements of T moved as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T per access when a thread moves VEC of them: at most 16 bytes (a wider struct
// would need 32-byte alignment, which the pointers are not checked for), at least one element.
template <typename T, int VEC>
struct Access {
  static constexpr int kPer16 = static_cast<int>(16 / sizeof(T));
  static constexpr int N = VEC < kPer16 ? VEC : kPer16;
  static_assert(VEC % N == 0, "VEC must be a whole number of accesses");
};

// dst[0..VEC) = the VEC elements of T at base + offset, widened to fp32.
template <typename T, int VEC>
__device__ __forceinline__ void load(const void* base, int64_t offset, float (&dst)[VEC]) {
  constexpr int N = Access<T, VEC>::N;
  const T* src = static_cast<const T*>(base) + offset;
#pragma unroll
  for (int j = 0; j < VEC / N; ++j) {
    const Pack<T, N> p = *(reinterpret_cast<const Pack<T, N>*>(src + j * N));
#pragma unroll
    for (int i = 0; i < N; ++i) dst[j * N + i] = to_float(p.v[i]);
  }
}

// The VEC fp32 values in src, narrowed to T and written at base + offset.
template <typename T, int VEC>
__device__ __forceinline__ void store(void* base, int64_t offset, const float (&src)[VEC]) {
  constexpr int N = Access<T, VEC>::N;
  T* dst = static_cast<T*>(base) + offset;
#pragma unroll
  for (int j = 0; j < VEC / N; ++j) {
    Pack<T, N> p;
#pragma unroll
    for (int i = 0; i < N; ++i) p.v[i] = from_float<T>(src[j * N + i]);
    *(reinterpret_cast<Pack<T, N>*>(dst + j * N)) = p;
  }
}

template <typename TS, typename TM, int VEC, bool HAS_UNCOND, bool HAS_G, bool HAS_NOISE>
__global__ void guided_step_kernel(GuidedStepArgs a, int64_t packs, int64_t packs_per_row) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t row = p / packs_per_row;
    const int64_t offset = p * VEC;
    float c[NUM_COEFFS];
#pragma unroll
    for (int k = 0; k < 13; ++k) c[k] = __ldg(a.coeffs + row * NUM_COEFFS + k);
    float x[VEC], ec[VEC], eu[VEC] = {}, gc[VEC] = {}, gu[VEC] = {}, z[VEC] = {};
    load<TS, VEC>(a.x, offset, x);
    load<TM, VEC>(a.eps_cond, offset, ec);
    if (HAS_UNCOND) load<TM, VEC>(a.eps_uncond, offset, eu);
    if (HAS_G) {
      load<TM, VEC>(a.g_cond, offset, gc);
      if (HAS_UNCOND) load<TM, VEC>(a.g_uncond, offset, gu);
    }
    if (HAS_NOISE) load<TS, VEC>(a.noise, offset, z);
    // Every input of this thread's elements is in registers before out is written: out may be x.
    float out[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = guided_value<HAS_UNCOND, HAS_G, HAS_NOISE>(c, x[i], eu[i], ec[i], gu[i], gc[i], z[i]);
    store<TS, VEC>(a.out, offset, out);
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16) == 0; }

template <typename TS, typename TM, int VEC, bool U, bool G, bool Z>
cudaError_t launch(const GuidedStepArgs& a, cudaStream_t stream) {
  const int64_t packs_per_row = a.row_size / VEC;
  const int64_t packs = a.rows * packs_per_row;
  if (packs == 0) return cudaSuccess;
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  constexpr int threads = 256;
  // Enough blocks for every SM to hold several; the grid-stride loop covers the rest.
  const int64_t wanted = (packs + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 8LL * sms ? wanted : 8LL * sms);
  guided_step_kernel<TS, TM, VEC, U, G, Z><<<blocks, threads, 0, stream>>>(a, packs, packs_per_row);
  return cudaGetLastError();
}

template <typename TS, typename TM, int VEC>
cudaError_t dispatch_flags(const GuidedStepArgs& a, cudaStream_t s) {
  const bool u = a.eps_uncond != nullptr, g = a.g_cond != nullptr, z = a.noise != nullptr;
  if (u && g && z) return launch<TS, TM, VEC, true, true, true>(a, s);
  if (u && g && !z) return launch<TS, TM, VEC, true, true, false>(a, s);
  if (u && !g && z) return launch<TS, TM, VEC, true, false, true>(a, s);
  if (u && !g && !z) return launch<TS, TM, VEC, true, false, false>(a, s);
  if (!u && g && z) return launch<TS, TM, VEC, false, true, true>(a, s);
  if (!u && g && !z) return launch<TS, TM, VEC, false, true, false>(a, s);
  if (!u && !g && z) return launch<TS, TM, VEC, false, false, true>(a, s);
  return launch<TS, TM, VEC, false, false, false>(a, s);
}

template <typename TS, typename TM>
cudaError_t dispatch_width(const GuidedStepArgs& a, cudaStream_t s) {
  // One 16-byte access of the narrower type (TM is never wider than TS): 4 fp32 or 8 16-bit
  // elements. Every offset a thread touches is then a multiple of VEC elements, i.e. of 16 bytes
  // in both types, given 16-byte aligned pointers and a row size divisible by VEC.
  static_assert(sizeof(TM) <= sizeof(TS), "the model outputs are never wider than the state");
  constexpr int VEC = static_cast<int>(16 / sizeof(TM));
  const bool vectorisable = a.row_size % VEC == 0 && aligned16(a.x) && aligned16(a.eps_uncond) &&
                            aligned16(a.eps_cond) && aligned16(a.g_uncond) && aligned16(a.g_cond) &&
                            aligned16(a.noise) && aligned16(a.out);
  return vectorisable ? dispatch_flags<TS, TM, VEC>(a, s) : dispatch_flags<TS, TM, 1>(a, s);
}

}  // namespace

const char* guided_step_cuda(const GuidedStepArgs& args, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaSuccess;
  // The entry file (guided_step.cpp) admits only the pairs of supported_dtypes().
  switch (args.dtype) {
    case DType::Float32:
      switch (args.model_dtype) {
        case DType::Float32: err = dispatch_width<float, float>(args, s); break;
        case DType::Float16: err = dispatch_width<float, __half>(args, s); break;
        case DType::BFloat16: err = dispatch_width<float, __nv_bfloat16>(args, s); break;
      }
      break;
    case DType::Float16: err = dispatch_width<__half, __half>(args, s); break;
    case DType::BFloat16: err = dispatch_width<__nv_bfloat16, __nv_bfloat16>(args, s); break;
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace invdiff
