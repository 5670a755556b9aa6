// CUDA implementation of invdiff::guided_step. Memory-bound: each thread moves 16 bytes per
// input per iteration (float4, or 8 halves / bfloat16s), does the update in fp32 and writes 16
// bytes. Rows whose size or pointers do not allow 16-byte accesses take the scalar kernel.
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

// VEC elements of T moved as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const void* base, int64_t offset, float (&dst)[VEC]) {
  const Pack<T, VEC> p = *(reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(base) + offset));
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = to_float(p.v[i]);
}

template <typename T, int VEC, bool HAS_UNCOND, bool HAS_G, bool HAS_NOISE>
__global__ void guided_step_kernel(GuidedStepArgs a, int64_t packs, int64_t packs_per_row) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t row = p / packs_per_row;
    const int64_t offset = p * VEC;
    float c[NUM_COEFFS];
#pragma unroll
    for (int k = 0; k < 13; ++k) c[k] = __ldg(a.coeffs + row * NUM_COEFFS + k);
    float x[VEC], ec[VEC], eu[VEC] = {}, gc[VEC] = {}, gu[VEC] = {}, z[VEC] = {};
    load<T, VEC>(a.x, offset, x);
    load<T, VEC>(a.eps_cond, offset, ec);
    if (HAS_UNCOND) load<T, VEC>(a.eps_uncond, offset, eu);
    if (HAS_G) {
      load<T, VEC>(a.g_cond, offset, gc);
      if (HAS_UNCOND) load<T, VEC>(a.g_uncond, offset, gu);
    }
    if (HAS_NOISE) load<T, VEC>(a.noise, offset, z);
    Pack<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      out.v[i] = from_float<T>(guided_value<HAS_UNCOND, HAS_G, HAS_NOISE>(c, x[i], eu[i], ec[i], gu[i], gc[i], z[i]));
    }
    *(reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(a.out) + offset)) = out;
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16) == 0; }

template <typename T, int VEC, bool U, bool G, bool Z>
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
  guided_step_kernel<T, VEC, U, G, Z><<<blocks, threads, 0, stream>>>(a, packs, packs_per_row);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t dispatch_flags(const GuidedStepArgs& a, cudaStream_t s) {
  const bool u = a.eps_uncond != nullptr, g = a.g_cond != nullptr, z = a.noise != nullptr;
  if (u && g && z) return launch<T, VEC, true, true, true>(a, s);
  if (u && g && !z) return launch<T, VEC, true, true, false>(a, s);
  if (u && !g && z) return launch<T, VEC, true, false, true>(a, s);
  if (u && !g && !z) return launch<T, VEC, true, false, false>(a, s);
  if (!u && g && z) return launch<T, VEC, false, true, true>(a, s);
  if (!u && g && !z) return launch<T, VEC, false, true, false>(a, s);
  if (!u && !g && z) return launch<T, VEC, false, false, true>(a, s);
  return launch<T, VEC, false, false, false>(a, s);
}

template <typename T>
cudaError_t dispatch_width(const GuidedStepArgs& a, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vectorisable = a.row_size % VEC == 0 && aligned16(a.x) && aligned16(a.eps_uncond) &&
                            aligned16(a.eps_cond) && aligned16(a.g_uncond) && aligned16(a.g_cond) &&
                            aligned16(a.noise) && aligned16(a.out);
  return vectorisable ? dispatch_flags<T, VEC>(a, s) : dispatch_flags<T, 1>(a, s);
}

}  // namespace

const char* guided_step_cuda(const GuidedStepArgs& args, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaSuccess;
  switch (args.dtype) {
    case DType::Float32: err = dispatch_width<float>(args, s); break;
    case DType::Float16: err = dispatch_width<__half>(args, s); break;
    case DType::BFloat16: err = dispatch_width<__nv_bfloat16>(args, s); break;
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace invdiff
