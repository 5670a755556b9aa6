// invdiff._C: the entry file. Checks every input with a message a user can act on, then hands
// raw pointers to the CPU or CUDA implementation. Registers the op with the torch dispatcher
// (invdiff_C::guided_step, plus an .out variant) so torch.compile and CUDA graphs see one op;
// the fake (meta) implementation lives in invdiff/_ext.py.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <sstream>
#include <string>
#include <vector>

#include "guided_step.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace invdiff {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << " " << t.sizes() << " on " << t.device();
  return s.str();
}

// Shape, device and contiguity of every image tensor against x. Dtypes are checked per group
// (state: x, noise, out; model outputs: eps_*, g_*) by checked_args.
void check_image(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), "guided_step: ", name, " has shape ", t.sizes(), " but x has ", x.sizes(),
              "; every image tensor must have x's shape");
  TORCH_CHECK(t.device() == x.device(), "guided_step: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "guided_step: ", name, " is not contiguous (strides ", t.strides(),
              "); call .contiguous() first: the fused step reads each tensor as one flat array");
}

void check_dtype(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref, const char* group) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "guided_step: ", name, " is ", t.scalar_type(), " but ", ref_name,
              " is ", ref.scalar_type(), "; pass ", group, " in one dtype");
}

DType dtype_of(const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "guided_step: ", name, " is ", t.scalar_type(),
                  "; supported dtypes are float32, float16 and bfloat16 (the math is fp32 for all)");
  }
  return DType::Float32;
}

GuidedStepArgs checked_args(const at::Tensor& x, const c10::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
                            const c10::optional<at::Tensor>& g_uncond, const c10::optional<at::Tensor>& g_cond,
                            const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise, const at::Tensor& out) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) >= 1, "guided_step: x must be (B, ...) with B >= 1, got ", x.sizes());
  const DType dtype = dtype_of("x", x);
  TORCH_CHECK(x.is_contiguous(), "guided_step: x is not contiguous (strides ", x.strides(),
              "); call .contiguous() first: the fused step reads each tensor as one flat array");
  check_image("eps_cond", eps_cond, x);
  if (eps_uncond) check_image("eps_uncond", *eps_uncond, x);
  if (g_cond) check_image("g_cond", *g_cond, x);
  if (g_uncond) check_image("g_uncond", *g_uncond, x);
  if (noise) check_image("noise", *noise, x);
  check_image("out", out, x);
  // Two dtype groups (guided_step.h): the state, and the model outputs, which share eps_cond's.
  constexpr const char* kState = "the state (x, noise, out)";
  constexpr const char* kModel = "the model outputs (eps_uncond, eps_cond, g_uncond, g_cond)";
  if (noise) check_dtype("noise", *noise, "x", x, kState);
  check_dtype("out", out, "x", x, kState);
  if (eps_uncond) check_dtype("eps_uncond", *eps_uncond, "eps_cond", eps_cond, kModel);
  if (g_cond) check_dtype("g_cond", *g_cond, "eps_cond", eps_cond, kModel);
  if (g_uncond) check_dtype("g_uncond", *g_uncond, "eps_cond", eps_cond, kModel);
  const DType model_dtype = dtype_of("eps_cond", eps_cond);
  TORCH_CHECK(supported_dtypes(dtype, model_dtype), "guided_step: the model outputs are ", eps_cond.scalar_type(),
              " but x is ", x.scalar_type(), "; the model outputs must be in x's dtype, or float16/bfloat16 "
              "with a float32 x (an fp32 sampler state fed by a 16-bit model)");
  TORCH_CHECK(!g_uncond || eps_uncond, "guided_step: g_uncond was given without eps_uncond; the unconditional G "
              "output only makes sense with classifier-free guidance");
  TORCH_CHECK(!eps_uncond || !g_cond || g_uncond, "guided_step: with eps_uncond (CFG) and g_cond, g_uncond is "
              "needed too: G guides both branches");
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat && coeffs.dim() == 2 && coeffs.size(0) == x.size(0) &&
                  coeffs.size(1) == NUM_COEFFS && coeffs.is_contiguous(),
              "guided_step: coeffs must be a contiguous float32 (B, ", static_cast<int>(NUM_COEFFS),
              ") table with B = ", x.size(0), " (build it with invdiff.sampling.step_coeffs), got ", describe(coeffs));
  TORCH_CHECK(coeffs.device() == x.device(), "guided_step: coeffs is on ", coeffs.device(), " but x is on ", x.device());

  GuidedStepArgs a;
  a.x = x.data_ptr();
  a.eps_cond = eps_cond.data_ptr();
  a.eps_uncond = eps_uncond ? eps_uncond->data_ptr() : nullptr;
  a.g_cond = g_cond ? g_cond->data_ptr() : nullptr;
  a.g_uncond = g_uncond ? g_uncond->data_ptr() : nullptr;
  a.noise = noise ? noise->data_ptr() : nullptr;
  a.coeffs = coeffs.data_ptr<float>();
  a.out = out.data_ptr();
  a.rows = x.size(0);
  a.row_size = x.numel() / x.size(0);
  a.dtype = dtype;
  a.model_dtype = model_dtype;
  return a;
}

}  // namespace

at::Tensor& guided_step_out(const at::Tensor& x, const c10::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
                            const c10::optional<at::Tensor>& g_uncond, const c10::optional<at::Tensor>& g_cond,
                            const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise, at::Tensor& out) {
  const GuidedStepArgs args = checked_args(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise, out);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const char* err = guided_step_cuda(args, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == nullptr, "guided_step: CUDA launch failed: ", err ? err : "");
#else
    TORCH_CHECK(false, "guided_step: invdiff._C was built without CUDA; reinstall with a CUDA torch and nvcc "
                "(or INVDIFF_FORCE_CUDA=1), or use invdiff.ops.guided_step, which falls back to PyTorch");
#endif
  } else {
    TORCH_CHECK(x.is_cpu(), "guided_step: unsupported device ", x.device());
    guided_step_cpu(args);
  }
  return out;
}

at::Tensor guided_step(const at::Tensor& x, const c10::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
                       const c10::optional<at::Tensor>& g_uncond, const c10::optional<at::Tensor>& g_cond,
                       const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  guided_step_out(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise, out);
  return out;
}

}  // namespace invdiff

TORCH_LIBRARY(invdiff_C, m) {
  m.def("guided_step(Tensor x, Tensor? eps_uncond, Tensor eps_cond, Tensor? g_uncond, Tensor? g_cond, "
        "Tensor coeffs, Tensor? noise) -> Tensor");
  m.def("guided_step.out(Tensor x, Tensor? eps_uncond, Tensor eps_cond, Tensor? g_uncond, Tensor? g_cond, "
        "Tensor coeffs, Tensor? noise, *, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(invdiff_C, CPU, m) {
  m.impl("guided_step", &invdiff::guided_step);
  m.impl("guided_step.out", &invdiff::guided_step_out);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(invdiff_C, CUDA, m) {
  m.impl("guided_step", &invdiff::guided_step);
  m.impl("guided_step.out", &invdiff::guided_step_out);
}
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_runtime"] = CUDART_VERSION;
#else
  info["with_cuda"] = false;
  info["cuda_runtime"] = pybind11::none();
#endif
  info["num_coeffs"] = static_cast<int>(invdiff::NUM_COEFFS);
  info["abi_version"] = invdiff::kAbiVersion;
  return info;
}

std::vector<std::pair<std::string, int>> coeff_layout() {
  using namespace invdiff;
  return {{"C_EPS", C_EPS}, {"C_G", C_G}, {"CFG_SCALE", CFG_SCALE}, {"X0_FROM_X", X0_FROM_X},
          {"X0_FROM_M", X0_FROM_M}, {"CLIP", CLIP}, {"EPS_FROM_X", EPS_FROM_X}, {"EPS_FROM_M", EPS_FROM_M},
          {"EPS_FROM_X0", EPS_FROM_X0}, {"PREV_FROM_X0", PREV_FROM_X0}, {"PREV_FROM_EPS", PREV_FROM_EPS},
          {"PREV_FROM_X", PREV_FROM_X}, {"NOISE_SCALE", NOISE_SCALE}};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "invdiff's C++/CUDA extension: the fused guided sampling step (torch.ops.invdiff_C.guided_step)";
  m.def("build_info", &build_info, "torch version, CUDA runtime and coefficient count this build was compiled with");
  m.def("coeff_layout", &coeff_layout, "(name, column) pairs of the coefficient table");
}
