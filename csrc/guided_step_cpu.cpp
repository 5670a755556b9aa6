// CPU implementation of invdiff::guided_step: parallel over (sample, chunk) with
// at::parallel_for (OpenMP: setup.py compiles with -fopenmp, without which the pragma in ATen's
// header is ignored and the loop runs on one thread). Within a chunk, fp16/bf16 tiles are widened
// to fp32, updated by a loop the compiler vectorises, and narrowed back; fp32 is used in place.
// One read of each input, one write of the output. TS is the state's type (x, noise, out), TM the
// model outputs' (eps_*, g_*): the same, or a 16-bit TM with an fp32 state (guided_step.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "guided_step.h"

namespace invdiff {
namespace {

constexpr int64_t kChunk = 4096;  // elements per parallel work item: big enough to amortise scheduling
constexpr int64_t kTile = 256;    // elements converted to fp32 at a time: stays in L1

// fp32 inputs are read in place; fp16/bf16 tiles are widened into `tile` first.
template <typename T>
inline const float* load_tile(const void* base, int64_t offset, int64_t n, float* tile) {
  const T* src = static_cast<const T*>(base) + offset;
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) tile[i] = static_cast<float>(src[i]);
    return tile;
  }
}

template <typename TS, typename TM, bool HAS_UNCOND, bool HAS_G, bool HAS_NOISE>
void run(const GuidedStepArgs& a) {
  const int64_t chunks_per_row = (a.row_size + kChunk - 1) / kChunk;
  at::parallel_for(0, a.rows * chunks_per_row, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float tiles[7][kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / chunks_per_row;
      const int64_t col_begin = (item % chunks_per_row) * kChunk;
      const int64_t col_end = std::min(a.row_size, col_begin + kChunk);
      float c[NUM_COEFFS];
      std::memcpy(c, a.coeffs + row * NUM_COEFFS, sizeof(c));
      for (int64_t col = col_begin; col < col_end; col += kTile) {
        const int64_t n = std::min(kTile, col_end - col);
        const int64_t offset = row * a.row_size + col;
        const float* __restrict__ x = load_tile<TS>(a.x, offset, n, tiles[0]);
        const float* __restrict__ ec = load_tile<TM>(a.eps_cond, offset, n, tiles[1]);
        const float* __restrict__ eu = HAS_UNCOND ? load_tile<TM>(a.eps_uncond, offset, n, tiles[2]) : nullptr;
        const float* __restrict__ gc = HAS_G ? load_tile<TM>(a.g_cond, offset, n, tiles[3]) : nullptr;
        const float* __restrict__ gu = HAS_G && HAS_UNCOND ? load_tile<TM>(a.g_uncond, offset, n, tiles[4]) : nullptr;
        const float* __restrict__ z = HAS_NOISE ? load_tile<TS>(a.noise, offset, n, tiles[5]) : nullptr;
        // out may be x itself (out=x): with an fp32 state each element is read before it is written.
        float* __restrict__ out = std::is_same_v<TS, float> ? static_cast<float*>(a.out) + offset : tiles[6];
        for (int64_t i = 0; i < n; ++i) {
          // Unused operands are 0 (a compile-time choice), never an unread buffer.
          out[i] = guided_value<HAS_UNCOND, HAS_G, HAS_NOISE>(
              c, x[i], HAS_UNCOND ? eu[i] : 0.f, ec[i], HAS_UNCOND && HAS_G ? gu[i] : 0.f, HAS_G ? gc[i] : 0.f,
              HAS_NOISE ? z[i] : 0.f);
        }
        if constexpr (!std::is_same_v<TS, float>) {
          TS* dst = static_cast<TS*>(a.out) + offset;
          for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<TS>(out[i]);
        }
      }
    }
  });
}

template <typename TS, typename TM>
void dispatch_flags(const GuidedStepArgs& a) {
  const bool u = a.eps_uncond != nullptr, g = a.g_cond != nullptr, z = a.noise != nullptr;
  // 8 instantiations per dtype pair: each inner loop is compiled without the branches it does not need.
  if (u && g && z) return run<TS, TM, true, true, true>(a);
  if (u && g && !z) return run<TS, TM, true, true, false>(a);
  if (u && !g && z) return run<TS, TM, true, false, true>(a);
  if (u && !g && !z) return run<TS, TM, true, false, false>(a);
  if (!u && g && z) return run<TS, TM, false, true, true>(a);
  if (!u && g && !z) return run<TS, TM, false, true, false>(a);
  if (!u && !g && z) return run<TS, TM, false, false, true>(a);
  return run<TS, TM, false, false, false>(a);
}

}  // namespace

void guided_step_cpu(const GuidedStepArgs& args) {
  // The entry file (guided_step.cpp) admits only the pairs of supported_dtypes().
  switch (args.dtype) {
    case DType::Float32:
      switch (args.model_dtype) {
        case DType::Float32: return dispatch_flags<float, float>(args);
        case DType::Float16: return dispatch_flags<float, c10::Half>(args);
        case DType::BFloat16: return dispatch_flags<float, c10::BFloat16>(args);
      }
      return;
    case DType::Float16: return dispatch_flags<c10::Half, c10::Half>(args);
    case DType::BFloat16: return dispatch_flags<c10::BFloat16, c10::BFloat16>(args);
  }
}

}  // namespace invdiff
