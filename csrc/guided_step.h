// invdiff::guided_step: one sampling step of guided diffusion, fused.
//
// Shared by the CPU (guided_step_cpu.cpp) and CUDA (guided_step_cuda.cu) implementations: the
// per-sample coefficient layout, the raw-pointer argument block, and the per-element math, so
// the two cannot drift apart. Plain C++ (no torch headers), so the .cu compiles with nvcc alone.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define INVDIFF_HD __host__ __device__ __forceinline__
#else
#define INVDIFF_HD inline
#endif

namespace invdiff {

// Columns of the (B, NUM_COEFFS) float32 coefficient table, one row per sample. Every
// scheduler the op supports (DDIM with any eta, DDPM ancestral, Euler) is a linear update in
// (x, m, x0, eps) with per-sample numbers; invdiff/sampling/step_coeffs.py builds the rows;
// invdiff/ops_contract.py (Col, re-exported by invdiff/ops/reference.py) mirrors
// this enum (a test checks that the two agree).
enum Coeff : int {
  C_EPS = 0,          // m_branch = C_EPS * eps_frozen + C_G * g   (the combine rule r and strength s)
  C_G = 1,
  CFG_SCALE = 2,      // m = m_uncond + CFG_SCALE * (m_cond - m_uncond)
  X0_FROM_X = 3,      // x0 = X0_FROM_X * x + X0_FROM_M * m
  X0_FROM_M = 4,
  CLIP = 5,           // x0 = clamp(x0, -CLIP, CLIP) when CLIP > 0
  EPS_FROM_X = 6,     // eps = EPS_FROM_X * x + EPS_FROM_M * m + EPS_FROM_X0 * x0
  EPS_FROM_M = 7,
  EPS_FROM_X0 = 8,
  PREV_FROM_X0 = 9,   // x_prev = PREV_FROM_X0 * x0 + PREV_FROM_EPS * eps + PREV_FROM_X * x
  PREV_FROM_EPS = 10,
  PREV_FROM_X = 11,
  NOISE_SCALE = 12,   //          + NOISE_SCALE * z
  NUM_COEFFS = 16,    // padded to 64 bytes per row
};

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// The version of this argument block and of the dtype rules below. invdiff/_ext.py refuses an
// invdiff._C whose version differs from the one it expects (a stale build would reject, or
// misread, inputs the Python side sends). 2: the model outputs may be narrower than the state.
constexpr int kAbiVersion = 2;

// Everything an implementation needs, as raw pointers into contiguous (rows, row_size) arrays
// (coeffs: float32). Optional inputs are nullptr. Two dtypes: the sampler's state (x, noise,
// out) in `dtype`, and the model outputs (eps_uncond, eps_cond, g_uncond, g_cond) in
// `model_dtype`, which is `dtype`, or bf16/fp16 with an fp32 state: the engine keeps x in fp32
// so that the sample is not rounded to bf16 every step, while a bf16 UNet's outputs are read as
// they are (half the bytes of an fp32 copy).
struct GuidedStepArgs {
  const void* x = nullptr;
  const void* eps_uncond = nullptr;
  const void* eps_cond = nullptr;
  const void* g_uncond = nullptr;
  const void* g_cond = nullptr;
  const void* noise = nullptr;
  const float* coeffs = nullptr;
  void* out = nullptr;
  int64_t rows = 0;
  int64_t row_size = 0;
  DType dtype = DType::Float32;        // x, noise, out
  DType model_dtype = DType::Float32;  // eps_uncond, eps_cond, g_uncond, g_cond
};

// The (state, model) dtype pairs every implementation handles.
INVDIFF_HD bool supported_dtypes(DType state, DType model) {
  return model == state || (state == DType::Float32 && (model == DType::Float16 || model == DType::BFloat16));
}

// The per-element update, in fp32. `c` points at one sample's coefficient row.
template <bool HAS_UNCOND, bool HAS_G, bool HAS_NOISE>
INVDIFF_HD float guided_value(const float* c, float x, float eps_u, float eps_c, float g_u, float g_c, float z) {
  float m = c[C_EPS] * eps_c;
  if (HAS_G) m += c[C_G] * g_c;
  if (HAS_UNCOND) {
    float m_u = c[C_EPS] * eps_u;
    if (HAS_G) m_u += c[C_G] * g_u;
    m = m_u + c[CFG_SCALE] * (m - m_u);
  }
  float x0 = c[X0_FROM_X] * x + c[X0_FROM_M] * m;
  const float clip = c[CLIP];
  if (clip > 0.f) x0 = x0 < -clip ? -clip : (x0 > clip ? clip : x0);
  const float eps = c[EPS_FROM_X] * x + c[EPS_FROM_M] * m + c[EPS_FROM_X0] * x0;
  float out = c[PREV_FROM_X0] * x0 + c[PREV_FROM_EPS] * eps + c[PREV_FROM_X] * x;
  if (HAS_NOISE) out += c[NOISE_SCALE] * z;
  return out;
}

// Implementations. The CUDA launcher returns nullptr on success, else the CUDA error string.
void guided_step_cpu(const GuidedStepArgs& args);
const char* guided_step_cuda(const GuidedStepArgs& args, void* stream);

}  // namespace invdiff
