"""The fused guided step (invdiff._C) against the reference and against diffusers' own
scheduler.step, and its input checks, dispatch, registration and guarded load."""
import copy
import itertools
import os
import zlib

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from invdiff import _ext, ops
from invdiff.ops import BackendError, reference
from invdiff.sampling.step_coeffs import NUM_COEFFS, Col, UnsupportedScheduler, guidance_columns, plan_steps
from tests.utils import assert_close_to_ref, rounding_atol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
C_OPS = torch.ops.invdiff_C


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("INVDIFF_BACKEND", raising=False)


def test_the_extension_is_built_and_dispatched_to():
    module, reason = _ext.extension()
    assert module is not None, reason
    x = torch.zeros(2, 3)
    assert ops.select_backend("guided_step", [x, x], [torch.zeros(2, NUM_COEFFS)]).name == "cpp"


def test_coefficient_layout_matches_the_cpp_header():
    module, _ = _ext.extension()
    assert dict(module.coeff_layout()) == {c.name: int(c) for c in Col}
    assert module.build_info()["num_coeffs"] == NUM_COEFFS


def _inputs(b, shape, dtype, uncond=True, g=True, noise=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def t():
        return torch.randn(b, *shape, generator=gen).to(dtype)

    coeffs = torch.randn(b, NUM_COEFFS, generator=gen)
    coeffs[:, Col.CLIP] = torch.where(torch.rand(b, generator=gen) < 0.5, 0.0, 1.5)
    return dict(
        x=t(), eps_uncond=t() if uncond else None, eps_cond=t(), g_uncond=t() if (uncond and g) else None,
        g_cond=t() if g else None, coeffs=coeffs, noise=t() if noise else None,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("uncond, g, noise", list(itertools.product([True, False], repeat=3)))
def test_matches_the_reference_for_every_input_combination(dtype, uncond, g, noise):
    """All eight compiled variants, a non-power-of-two sample size, and clipping on some rows."""
    args = _inputs(5, (3, 7, 9), dtype, uncond, g, noise)
    out = ops.guided_step(**args)
    same = reference.guided_step(**args)
    ref = reference.guided_step(**{k: (v.double() if (v is not None and k != "coeffs") else v) for k, v in args.items()})
    assert out.dtype == dtype
    assert_close_to_ref(out, ref, same, atol=rounding_atol(dtype, float(ref.abs().max())), name="guided_step")


MODEL_DTYPES = [torch.bfloat16, torch.float16]


def _mixed(args, model_dtype):
    """args with the model outputs (eps_*, g_*) in `model_dtype`; x and noise stay fp32."""
    return {k: (v.to(model_dtype) if (v is not None and k.startswith(("eps_", "g_"))) else v) for k, v in args.items()}


@pytest.mark.parametrize("model_dtype", MODEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("uncond, g, noise", list(itertools.product([True, False], repeat=3)))
def test_16_bit_model_outputs_with_an_fp32_state(model_dtype, uncond, g, noise):
    """What the engine sends: an fp32 x and noise, the UNet's (and G's) outputs in bf16/fp16 as they
    come. The C++ path reads them as they are and matches the fp64 reference of the same inputs."""
    args = _mixed(_inputs(5, (3, 7, 9), torch.float32, uncond, g, noise), model_dtype)
    tensors = [v for k, v in args.items() if v is not None and k != "coeffs"]
    assert ops.select_backend("guided_step", tensors, [args["coeffs"]]).name == "cpp"
    out = ops.guided_step(**args)
    same = reference.guided_step(**args)
    ref = reference.guided_step(**{k: (v.double() if (v is not None and k != "coeffs") else v) for k, v in args.items()})
    assert out.dtype == torch.float32
    assert_close_to_ref(out, ref, same, atol=rounding_atol(torch.float32, float(ref.abs().max())), name="guided_step")


@pytest.mark.parametrize("model_dtype", MODEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_16_bit_model_outputs_in_place_on_an_odd_row(model_dtype):
    """out=x (the engine's call) with a row size that is not a multiple of any vector width."""
    args = _mixed(_inputs(3, (1, 5, 7), torch.float32), model_dtype)
    ref = reference.guided_step(**{k: (v.double() if (v is not None and k != "coeffs") else v) for k, v in args.items()})
    same = reference.guided_step(**args)
    x = args["x"].clone()
    returned = ops.guided_step(**{**args, "x": x}, out=x)
    assert returned.data_ptr() == x.data_ptr()
    assert_close_to_ref(x, ref, same, atol=rounding_atol(torch.float32, float(ref.abs().max())), name="guided_step out=x")


# (x's dtype, the model outputs' dtype) pairs no backend takes: a narrower state than the model,
# or two different 16-bit types, or fp64 next to fp32 (the reference alone runs fp64, and only
# with fp64 everywhere).
REFUSED_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.bfloat16),
                 (torch.bfloat16, torch.float16), (torch.float32, torch.float64), (torch.float64, torch.float32)]


@pytest.mark.parametrize("state, model", REFUSED_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_unsupported_dtype_pairs_are_one_clear_error(state, model):
    args = _inputs(2, (3, 4, 4), torch.float32)
    args = {k: (v if v is None or k == "coeffs" else v.to(model if k.startswith(("eps_", "g_")) else state))
            for k, v in args.items()}
    with pytest.raises(ValueError, match="model outputs must be in x's dtype, or float16/bfloat16 with a float32 x"):
        ops.guided_step(**args)
    if torch.float64 not in (state, model):  # the extension names its own dtypes for fp64
        with pytest.raises(RuntimeError, match="model outputs must be in x's dtype"):
            C_OPS.guided_step(*args.values())


def test_batch_of_one_and_large_rows():
    args = _inputs(1, (4, 64, 64), torch.float32)
    torch.testing.assert_close(ops.guided_step(**args), reference.guided_step(**args), rtol=1e-6, atol=1e-5)


def test_out_may_be_x_itself():
    args = _inputs(3, (2, 5, 5), torch.float32)
    expected = reference.guided_step(**args)
    x = args["x"].clone()
    returned = ops.guided_step(**{**args, "x": x}, out=x)
    assert returned.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected)


# ----------------------------------------------------------------------- against diffusers

def _diffusers_schedulers():
    common = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    for prediction in ("epsilon", "v_prediction", "sample"):
        for clip in (False, True):
            yield f"ddim-{prediction}-clip{int(clip)}", DDIMScheduler(prediction_type=prediction, clip_sample=clip, **common)
    for variance in ("fixed_small", "fixed_small_log", "fixed_large"):
        yield f"ddpm-{variance}", DDPMScheduler(prediction_type="v_prediction", variance_type=variance, clip_sample=False, **common)
    yield "ddpm-epsilon-clip", DDPMScheduler(prediction_type="epsilon", clip_sample=True, **common)
    for prediction in ("epsilon", "v_prediction"):
        yield f"euler-{prediction}", EulerDiscreteScheduler(prediction_type=prediction, beta_schedule="scaled_linear")


SCHEDULERS = dict(_diffusers_schedulers())


SEED_OFFSET = int(os.environ.get("INVDIFF_TEST_SEED_OFFSET", "0"))  # other draws, for checking the tolerance


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_sample_matches_diffusers_step_at_its_own_timestep(name, eta):
    """A batch whose samples sit at random steps of the schedule, with their own CFG scales and
    combine strengths: every row equals diffusers' scheduler.step on that sample alone."""
    scheduler = SCHEDULERS[name]
    is_ddim = isinstance(scheduler, DDIMScheduler)
    if eta and not is_ddim:
        with pytest.raises(UnsupportedScheduler, match="eta"):
            plan_steps(scheduler, 10, eta)
        return
    steps, batch, shape = 10, 6, (3, 8, 8)
    plan = plan_steps(scheduler, steps, eta)
    # zlib.crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), which made
    # this test draw new inputs on each run.
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000 + SEED_OFFSET)
    k = torch.randint(0, steps, (batch,), generator=gen)
    scales = torch.rand(batch, generator=gen, dtype=torch.float64) * 6
    x = torch.randn(batch, *shape, generator=gen) * 2
    eps_u, eps_c, g_u, g_c = (torch.randn(batch, *shape, generator=gen) for _ in range(4))
    coeffs = guidance_columns(plan.coeffs[k].clone(), 2.0, 0.7, scales).float()
    seeds = torch.randint(0, 2**31, (batch,), generator=gen).tolist()
    noise = torch.zeros(batch, *shape)
    for i in range(batch):
        if plan.draws_noise[k[i]]:
            noise[i] = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seeds[i]))[0]
    fused = ops.guided_step(x, eps_u, eps_c, g_u, g_c, coeffs, noise)

    a, b = 1.0, 2.0  # combine_coefficients(2.0): the residual branch
    for i in range(batch):
        sched = copy.deepcopy(scheduler)
        sched.set_timesteps(steps)
        t = sched.timesteps[k[i]]
        if isinstance(sched, EulerDiscreteScheduler):
            sched._step_index = int(k[i])  # what the pipeline's earlier steps would have left
        def m_of(eps, g):
            combined = a * eps + b * g
            return eps + 0.7 * (combined - eps)
        m_u, m_c = m_of(eps_u[i : i + 1], g_u[i : i + 1]), m_of(eps_c[i : i + 1], g_c[i : i + 1])
        m = m_u + float(scales[i]) * (m_c - m_u)
        kwargs = {"eta": eta, "generator": torch.Generator().manual_seed(seeds[i])} if is_ddim else {
            "generator": torch.Generator().manual_seed(seeds[i])}
        expected = sched.step(m, t, x[i : i + 1], **kwargs).prev_sample
        # Euler with sigma_max ~ 1e1..1e4 cancels x against x0 (and sigma * m) in fp32: allow a few
        # ulps of each term that enters x_prev, |x| times its coefficient and |m| times m's.
        c = plan.coeffs[k[i]].abs()
        m_coeff = float(c[Col.PREV_FROM_X0] * c[Col.X0_FROM_M] + c[Col.PREV_FROM_EPS] * (c[Col.EPS_FROM_M] + c[Col.EPS_FROM_X0] * c[Col.X0_FROM_M]))
        ulp = torch.finfo(torch.float32).eps
        atol = 1e-5 + 4 * ulp * (float(x[i].abs().max()) * float(c[Col.PREV_FROM_X] + 1) + float(m.abs().max()) * m_coeff)
        torch.testing.assert_close(fused[i : i + 1], expected, rtol=1e-5, atol=atol, msg=lambda msg: f"{name} row {i} (step {int(k[i])}): {msg}")


def test_plan_reports_why_a_scheduler_is_not_fused():
    with pytest.raises(UnsupportedScheduler, match="DPMSolverMultistepScheduler"):
        plan_steps(DPMSolverMultistepScheduler(), 10)
    with pytest.raises(UnsupportedScheduler, match="thresholding"):
        plan_steps(DDIMScheduler(thresholding=True), 10)
    with pytest.raises(UnsupportedScheduler, match="variance_type"):
        plan_steps(DDPMScheduler(variance_type="learned_range"), 10)


def test_plan_does_not_touch_the_callers_scheduler():
    sched = DDIMScheduler()
    plan_steps(sched, 7)
    assert sched.num_inference_steps is None


# ----------------------------------------------------------------------- bad input

def _good():
    x = torch.randn(2, 3, 4, 4)
    return dict(x=x, eps_uncond=torch.randn_like(x), eps_cond=torch.randn_like(x), g_uncond=None, g_cond=None,
                coeffs=torch.zeros(2, NUM_COEFFS), noise=None)


BAD = {
    "shape": (lambda a: a.update(eps_cond=a["eps_cond"][:, :2].contiguous()), "eps_cond has shape"),
    "dtype": (lambda a: a.update(eps_uncond=a["eps_uncond"].half()), "eps_uncond is"),
    "g_dtype": (lambda a: a.update(g_cond=torch.randn(2, 3, 4, 4, dtype=torch.bfloat16),
                                   g_uncond=torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)), "g_cond is .* but eps_cond"),
    "noise_dtype": (lambda a: a.update(noise=torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)), "noise is .* but x is"),
    "coeff_width": (lambda a: a.update(coeffs=torch.zeros(2, 8)), "coeffs must be"),
    "coeff_dtype": (lambda a: a.update(coeffs=torch.zeros(2, NUM_COEFFS, dtype=torch.float64)), "coeffs must be"),
    "coeff_rows": (lambda a: a.update(coeffs=torch.zeros(3, NUM_COEFFS)), "coeffs must be"),
    "g_uncond_alone": (lambda a: a.update(eps_uncond=None, g_uncond=torch.randn(2, 3, 4, 4)), "g_uncond"),
    "g_cond_without_g_uncond": (lambda a: a.update(g_cond=torch.randn(2, 3, 4, 4)), "g_uncond"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_mismatched_inputs_are_rejected_clearly(case):
    mutate, message = BAD[case]
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ops.guided_step(**args)
    with pytest.raises(RuntimeError, match=message):  # the extension's own TORCH_CHECKs
        C_OPS.guided_step(*args.values())


def test_integer_dtype_is_rejected_by_the_extension():
    args = {k: (v.to(torch.int32) if (v is not None and k != "coeffs") else v) for k, v in _good().items()}
    with pytest.raises(RuntimeError, match="supported dtypes"):
        C_OPS.guided_step(*args.values())


def test_non_contiguous_input_is_rejected_by_the_op_and_rerouted_by_dispatch(monkeypatch):
    args = _good()
    args["eps_cond"] = torch.randn(2, 4, 4, 3).permute(0, 3, 1, 2)
    with pytest.raises(RuntimeError, match="eps_cond is not contiguous"):
        C_OPS.guided_step(*args.values())
    torch.testing.assert_close(ops.guided_step(**args), reference.guided_step(**args))  # the reference takes strides
    monkeypatch.setenv("INVDIFF_BACKEND", "cpp")
    with pytest.raises(BackendError, match="non-contiguous"):
        ops.guided_step(**args)


# ----------------------------------------------------------------------- registration

def test_opcheck_and_compile():
    """Schema, fake (meta) implementation and a fullgraph torch.compile of a sampler step."""
    args = _inputs(2, (3, 4, 4), torch.float32)
    torch.library.opcheck(C_OPS.guided_step.default, tuple(args.values()), test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: ops.guided_step(**a) * 1.0, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(args), reference.guided_step(**args))


# ----------------------------------------------------------------------- guarded load

def test_missing_extension_is_one_warning_with_the_reason():
    def fail(name):
        raise ImportError("libc10.so: cannot open shared object file")

    with pytest.warns(RuntimeWarning, match="Using the PyTorch reference path") as record:
        module, reason = _ext.load_extension(importer=fail)
    assert module is None and "cannot open shared object" in reason
    assert len(record) == 1


def test_extension_built_for_another_torch_is_refused():
    real, _ = _ext.extension()

    class Stale:
        def build_info(self):
            return {**real.build_info(), "torch_version": "1.0.0"}

        def coeff_layout(self):
            return real.coeff_layout()

    with pytest.warns(RuntimeWarning, match="built against torch 1.0.0"):
        module, reason = _ext.load_extension(importer=lambda name: Stale())
    assert module is None and "rebuild" in reason


def test_extension_built_from_older_sources_is_refused():
    """A _C from before the mixed-dtype step (no or another argument-block version) would
    refuse the 16-bit model outputs the engine now sends: the reference path takes over."""
    real, _ = _ext.extension()
    assert real.build_info()["abi_version"] == _ext.ABI_VERSION

    class Old:
        def build_info(self):
            info = dict(real.build_info())
            del info["abi_version"]
            return info

        def coeff_layout(self):
            return real.coeff_layout()

    with pytest.warns(RuntimeWarning, match="argument-block version None"):
        module, reason = _ext.load_extension(importer=lambda name: Old())
    assert module is None and "rebuild" in reason
