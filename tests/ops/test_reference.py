"""invdiff.ops.reference (the oracle) and the invdiff.ops dispatch layer."""
from __future__ import annotations

import pytest
import torch

from invdiff import ops
from invdiff.ops import BackendError, reference
from tests.utils import assert_close_to_ref, kernel_device

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("INVDIFF_BACKEND", raising=False)


@pytest.fixture()
def triton_device(monkeypatch):
    """Force the Triton kernels and return the device they run on. Unforced, a CPU tensor is
    dispatched to the reference itself, and a test comparing the dispatched op with the reference
    could not fail; on the CPU the kernels run in Triton's interpreter (tests/conftest.py)."""
    monkeypatch.setenv("INVDIFF_BACKEND", "triton")
    return kernel_device()


# ----------------------------------------------------------------------------- combine rule


def test_combine_interpolation_branch_r_half():
    eps = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    g = torch.tensor([[5.0, 0.0], [-1.0, 2.0]])
    # 0.5 * g + 0.5 * eps, worked out by hand
    expected = torch.tensor([[3.0, 1.0], [1.0, -1.0]])
    assert torch.equal(reference.guidance_combine(eps, g, 0.5), expected)
    assert torch.equal(ops.guidance_combine(eps, g, 0.5), expected)


def test_combine_interpolation_branch_general_r():
    eps = torch.tensor([2.0, -1.0, 0.5])
    g = torch.tensor([-2.0, 3.0, 1.5])
    # r = 0.25: 0.25 * g + 0.75 * eps
    expected = torch.tensor([0.25 * -2.0 + 0.75 * 2.0, 0.25 * 3.0 + 0.75 * -1.0, 0.25 * 1.5 + 0.75 * 0.5])
    torch.testing.assert_close(ops.guidance_combine(eps, g, 0.25), expected, rtol=0, atol=1e-7)


def test_combine_r_one_gives_g():
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ops.guidance_combine(eps, g, 1.0), g)


def test_combine_residual_branch_r_two():
    eps = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    g = torch.tensor([[5.0, 0.0], [-1.0, 2.0]])
    # eps + 2 * g
    expected = torch.tensor([[11.0, 2.0], [1.0, 0.0]])
    assert torch.equal(reference.guidance_combine(eps, g, 2.0), expected)
    assert torch.equal(ops.guidance_combine(eps, g, 2.0), expected)


def test_combine_residual_branch_zero_g_is_eps():
    eps = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ops.guidance_combine(eps, torch.zeros_like(eps), 1.5), eps)


@pytest.mark.parametrize("ratio", [0.0, -0.5, -2.0, float("nan")])
def test_combine_rejects_non_positive_ratio(ratio):
    eps, g = torch.zeros(2, 2), torch.ones(2, 2)
    with pytest.raises(ValueError, match="ratio r must be > 0"):
        reference.guidance_combine(eps, g, ratio)
    with pytest.raises(ValueError, match="ratio r must be > 0"):
        ops.guidance_combine(eps, g, ratio)


@pytest.mark.parametrize("ratio", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_dispatch_matches_reference_within_dtype_tolerance(triton_device, ratio, dtype):
    gen = torch.Generator().manual_seed(3)
    eps64 = torch.randn(3, 3, 5, 7, generator=gen, dtype=torch.float64)
    g64 = torch.randn(3, 3, 7, 5, generator=gen, dtype=torch.float64).transpose(2, 3)  # non-contiguous
    ref64 = reference.guidance_combine(eps64, g64, ratio)
    eps, g = eps64.to(dtype), g64.to(dtype)
    assert ops.select_backend("guidance_combine", (eps.to(triton_device), g.to(triton_device))).name == "triton"
    out = ops.guidance_combine(eps.to(triton_device), g.to(triton_device), ratio).cpu()
    assert out.dtype == dtype
    assert_close_to_ref(out, ref64, reference.guidance_combine(eps, g, ratio), ATOL[dtype])


# ----------------------------------------------------------------------------- invariant loss
# Hand-worked example: target is zero except target[1] = [1, 0];
#   l_0 = mean([1, 1]^2) = 1, l_1 = mean([3-1, 0]^2) = 2, l_2 = 0, l_3 = mean([9, 1]) = 5.
PRED = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 0.0], [3.0, 1.0]], dtype=torch.float64).view(4, 1, 1, 2)
TARGET = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64).view(4, 1, 1, 2)
LOSSES = [1.0, 2.0, 0.0, 5.0]
W = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
# R_0 = (1*1 + 1*2 + 0.5*5) / (1 + 1 + 0.5) = 5.5 / 2.5 = 2.2
# R_1 = (1*0 + 0.5*5) / (1 + 0.5)           = 2.5 / 1.5 = 5/3
R0, R1 = 5.5 / 2.5, 2.5 / 1.5
MEAN = (R0 + R1) / 2
VAR = ((R0 - MEAN) ** 2 + (R1 - MEAN) ** 2) / (2 - 1)  # unbiased


def test_per_sample_mse_hand_values():
    assert reference.per_sample_mse(PRED, TARGET).tolist() == LOSSES


def test_group_risks_hand_values():
    risks, present = reference.group_risks(torch.tensor(LOSSES, dtype=torch.float64), W)
    torch.testing.assert_close(risks, torch.tensor([R0, R1], dtype=torch.float64), rtol=0, atol=1e-12)
    assert present.tolist() == [True, True]


@pytest.mark.parametrize("lam", [1.0, 0.5, 3.0])
def test_invariant_loss_hand_computation(lam):
    expected = MEAN + lam * VAR
    for fn in (reference.invariant_loss, ops.invariant_loss):
        out = fn(PRED, TARGET, W, lam)
        assert out.ndim == 0
        assert float(out) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.9333333333 + lam * 0.1422222222, abs=1e-9)  # the numbers, spelt out


def test_invariant_loss_lambda_zero_is_mean_of_group_risks():
    assert float(ops.invariant_loss(PRED, TARGET, W, 0.0)) == pytest.approx(MEAN, abs=1e-12)


def test_invariant_loss_drops_group_with_zero_weight_in_batch():
    w3 = torch.cat([W, torch.zeros(4, 1, dtype=W.dtype)], dim=1)  # group 2 absent from this batch
    w3_mid = torch.stack([W[:, 0], torch.zeros(4, dtype=W.dtype), W[:, 1]], dim=1)
    for w in (w3, w3_mid):
        out = ops.invariant_loss(PRED, TARGET, w, 1.0)
        assert float(out) == pytest.approx(MEAN + VAR, abs=1e-12)
    risks, present = reference.group_risks(torch.tensor(LOSSES, dtype=torch.float64), w3_mid)
    assert present.tolist() == [True, False, True]
    assert float(risks[1]) == 0.0


def _objective_by_indexing(risks, present, lam):
    """The objective spelt out on the present groups only (the boolean index the reference no
    longer uses), as the oracle for the masked version."""
    r = risks[present]
    if r.numel() <= 1:
        return r.sum()
    return r.mean() + lam * r.var(unbiased=True)


OBJECTIVE_CASES = {
    "all_present": ([2.2, 5 / 3, 0.7, 3.1], [True, True, True, True]),
    "absent_in_the_middle": ([2.2, 0.0, 5 / 3, 0.0, 0.9], [True, False, True, False, True]),
    "absent_at_the_ends": ([0.0, 1.5, 4.0, 0.0], [False, True, True, False]),
    "one_present": ([0.0, 2.5, 0.0], [False, True, False]),
    "none_present": ([0.0, 0.0], [False, False]),
    "absent_hold_junk": ([1.0, float("nan"), 3.0, float("inf")], [True, False, True, False]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("case", sorted(OBJECTIVE_CASES))
def test_invariant_objective_masks_without_indexing(case, lam, dtype):
    """Issue 14: the masked objective gives the values and gradients of the one computed on
    risks[present], absent groups included."""
    values, mask = OBJECTIVE_CASES[case]
    present = torch.tensor(mask)
    risks = torch.tensor(values, dtype=dtype, requires_grad=True)
    risks_ref = torch.tensor(values, dtype=dtype, requires_grad=True)
    out = reference.invariant_objective(risks, present, lam)
    expected = _objective_by_indexing(risks_ref, present, lam)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert out.ndim == 0 and out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    out.backward()
    expected.backward()
    torch.testing.assert_close(risks.grad, risks_ref.grad, rtol=tol, atol=tol)
    assert torch.isfinite(risks.grad).all()


def test_invariant_objective_compiles_without_a_graph_break():
    """Issue 14: no boolean-mask indexing (a host sync, and a graph break under torch.compile) in
    the reference loss."""
    import torch._dynamo

    torch._dynamo.reset()
    risks = torch.tensor([2.2, 0.0, 5 / 3], dtype=torch.float64)
    present = torch.tensor([True, False, True])
    explained = torch._dynamo.explain(reference.invariant_objective)(risks, present, 1.0)
    assert explained.graph_break_count == 0, explained.break_reasons
    w3_mid = torch.stack([W[:, 0], torch.zeros(4, dtype=W.dtype), W[:, 1]], dim=1)
    explained = torch._dynamo.explain(reference.invariant_loss)(PRED, TARGET, w3_mid, 1.0)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_invariant_loss_single_group_is_weighted_mean():
    w = torch.tensor([[1.0], [2.0], [0.0], [1.0]], dtype=torch.float64)
    weighted_mean = (1 * 1.0 + 2 * 2.0 + 0 * 0.0 + 1 * 5.0) / (1 + 2 + 0 + 1)  # = 2.5
    for lam in (0.0, 1.0, 10.0):
        assert float(ops.invariant_loss(PRED, TARGET, w, lam)) == pytest.approx(weighted_mean, abs=1e-12)
    # several groups of which only one has weight in the batch: also just that group's mean
    w2 = torch.cat([w, torch.zeros_like(w)], 1)
    assert float(ops.invariant_loss(PRED, TARGET, w2, 10.0)) == pytest.approx(weighted_mean, abs=1e-12)


def test_invariant_loss_single_group_keeps_gradient():
    pred = PRED.clone().requires_grad_(True)
    loss = ops.invariant_loss(pred, TARGET, torch.ones(4, 1, dtype=torch.float64), 1.0)
    loss.backward()
    # d/dpred mean_i mean_j (pred - target)^2 = 2 (pred - target) / (B * D)
    torch.testing.assert_close(pred.grad, 2 * (PRED - TARGET) / 8, rtol=0, atol=1e-12)


def test_invariant_loss_with_g_and_ratio_combines_first():
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(4, 1, 1, 2, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 1, 1, 2, generator=gen, dtype=torch.float64)
    for r in (0.5, 2.0):
        combined = reference.guidance_combine(eps, g, r)
        torch.testing.assert_close(
            ops.invariant_loss(eps, TARGET, W, 1.0, g=g, ratio=r),
            ops.invariant_loss(combined, TARGET, W, 1.0),
            rtol=0,
            atol=1e-12,
        )
    # r = 1: eps is ignored entirely, the loss is G's own
    torch.testing.assert_close(
        ops.invariant_loss(eps, TARGET, W, 1.0, g=PRED, ratio=1.0), torch.tensor(MEAN + VAR, dtype=torch.float64)
    )


def test_invariant_loss_rejects_negative_lambda():
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        ops.invariant_loss(PRED, TARGET, W, -0.1)


def test_invariant_loss_rejects_g_without_ratio_and_ratio_without_g():
    with pytest.raises(ValueError, match="both g and ratio"):
        ops.invariant_loss(PRED, TARGET, W, 1.0, g=PRED)
    with pytest.raises(ValueError, match="both g and ratio"):
        ops.invariant_loss(PRED, TARGET, W, 1.0, ratio=2.0)


def test_invariant_loss_rejects_bad_ratio_with_g():
    with pytest.raises(ValueError, match="ratio"):
        ops.invariant_loss(PRED, TARGET, W, 1.0, g=PRED, ratio=0.0)


@pytest.mark.parametrize(
    "weights",
    [
        torch.ones(4, dtype=torch.float64),  # (B,) instead of (B, K)
        torch.ones(3, 2, dtype=torch.float64),  # wrong batch size
        torch.ones(5, 2, dtype=torch.float64),
        torch.ones(4, 2, 1, dtype=torch.float64),  # 3-D
    ],
    ids=["1d", "B-1", "B+1", "3d"],
)
def test_invariant_loss_rejects_weights_of_wrong_shape(weights):
    with pytest.raises(ValueError, match=r"weights must be \(B, K\) with B=4"):
        ops.invariant_loss(PRED, TARGET, weights, 1.0)


def test_invariant_loss_gradcheck_wrt_g_and_pred():
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]], dtype=torch.float64)
    for r in (0.5, 2.0):
        assert torch.autograd.gradcheck(lambda e, gg: ops.invariant_loss(e, target, w, 1.0, g=gg, ratio=r), (eps, g))
    # with an empty group in the batch too
    w_empty = torch.cat([w, torch.zeros(3, 1, dtype=torch.float64)], 1)
    assert torch.autograd.gradcheck(
        lambda gg: ops.invariant_loss(eps.detach(), target, w_empty, 2.0, g=gg, ratio=2.0), (g,)
    )


# Edge-case grid (DESIGN.md): non-power-of-two sizes, one group, an empty group, K == batch,
# batch of 1, non-contiguous inputs. The fp64 reference is checked against a naive loop, and the
# dispatched op in each dtype against the fp64 reference with the dtype-aware tolerance.
CASES = {
    "non_pow2": dict(b=5, k=3, shape=(3, 5, 3)),
    "one_group": dict(b=4, k=1, shape=(2, 4, 4)),
    "empty_group": dict(b=6, k=3, shape=(1, 3, 3), empty=1),
    "K_eq_B": dict(b=4, k=4, shape=(1, 2, 2)),
    "batch_1": dict(b=1, k=2, shape=(3, 4, 4)),
    "non_contiguous": dict(b=4, k=2, shape=(3, 6, 5), noncontig=True),
}


def _naive_loss(pred, target, w, lam):
    b, k = w.shape
    losses = [float(((pred[i] - target[i]) ** 2).mean()) for i in range(b)]
    risks = []
    for j in range(k):
        s = sum(float(w[i, j]) for i in range(b))
        if s > 0:
            risks.append(sum(float(w[i, j]) * losses[i] for i in range(b)) / s)
    mean = sum(risks) / len(risks)
    if len(risks) == 1:
        return mean
    return mean + lam * sum((r - mean) ** 2 for r in risks) / (len(risks) - 1)


def _case_inputs(case):
    gen = torch.Generator().manual_seed(sum(map(ord, str(case))))
    b, k, (c, h, w_) = case["b"], case["k"], case["shape"]

    def rnd():
        if case.get("noncontig"):
            return torch.randn(b, c, w_, h, generator=gen, dtype=torch.float64).transpose(2, 3)
        return torch.randn(b, c, h, w_, generator=gen, dtype=torch.float64)

    eps, g, target = rnd(), rnd(), rnd()
    weights = torch.rand(b, k, generator=gen, dtype=torch.float64)
    if "empty" in case:
        weights[:, case["empty"]] = 0
    return eps, g, target, weights


@pytest.mark.parametrize("name", list(CASES))
def test_invariant_loss_fp64_reference_matches_naive_loop(name):
    eps, g, target, w = _case_inputs(CASES[name])
    for r in (0.5, 2.0):
        pred = eps + r * g if r > 1 else r * g + (1 - r) * eps
        expected = _naive_loss(pred, target, w, 1.5)
        assert float(reference.invariant_loss(eps, target, w, 1.5, g=g, ratio=r)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_invariant_loss_dispatch_within_dtype_tolerance(triton_device, name, dtype):
    eps, g, t, w = (x.to(dtype) for x in _case_inputs(CASES[name]))
    # The fp64 oracle runs on the inputs as rounded to `dtype` (as tests/utils.compare_to_reference
    # does): the kernel keeps eps_tilde in fp32 where the same-dtype reference rounds it, so
    # against the unrounded inputs the rounding of the inputs themselves, which cancels
    # differently in the two, decides the comparison (fp16 K_eq_B: 8.7e-4 vs a bound of 6.2e-4).
    eps64, g64, t64, w64 = (x.double() for x in (eps, g, t, w))
    ref64 = reference.invariant_loss(eps64, t64, w64, 1.0, g=g64, ratio=2.0)
    same = reference.invariant_loss(eps, t, w, 1.0, g=g, ratio=2.0)
    dev = [x.to(triton_device) for x in (eps, t, w)]
    assert ops.select_backend("invariant_loss", dev[:2] + [g.to(triton_device)], dev[2:]).name == "triton"
    out = ops.invariant_loss(dev[0], dev[1], dev[2], 1.0, g=g.to(triton_device), ratio=2.0).cpu()
    assert out.dtype == torch.float32  # accumulated in fp32 for the half types
    assert_close_to_ref(out, ref64, same, ATOL[dtype], name=f"L_e[{name},{dtype}]")

    # and the gradients w.r.t. g, same rule
    def grad(e, gg, tt, ww):
        gg = gg.detach().clone().requires_grad_(True)
        reference.invariant_loss(e, tt, ww, 1.0, g=gg, ratio=2.0).backward()
        return gg.grad

    g_fast = g.detach().to(triton_device).requires_grad_(True)
    ops.invariant_loss(dev[0], dev[1], dev[2], 1.0, g=g_fast, ratio=2.0).backward()
    assert_close_to_ref(g_fast.grad.cpu(), grad(eps64, g64, t64, w64), grad(eps, g, t, w), ATOL[dtype], name="dL/dg")


def test_assert_close_to_ref_helper_rejects_a_bad_output():
    ref64 = torch.linspace(-1, 1, 11, dtype=torch.float64)
    same = ref64.to(torch.bfloat16)
    # within 2x the bf16 reference's own error: accepted
    assert_close_to_ref(same.float(), ref64, same, 0.0)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_ref(same.float() + 0.05, ref64, same, 1e-3)


# ----------------------------------------------------------------------------- dispatch


def test_forced_reference_backend_works(monkeypatch):
    monkeypatch.setenv("INVDIFF_BACKEND", "reference")
    assert ops.select_backend("invariant_loss", [PRED]).name == "reference"
    assert float(ops.invariant_loss(PRED, TARGET, W, 1.0)) == pytest.approx(MEAN + VAR, abs=1e-12)
    assert torch.equal(ops.guidance_combine(PRED, TARGET, 2.0), PRED + 2 * TARGET)


def test_unknown_forced_backend_raises_clear_error(monkeypatch):
    monkeypatch.setenv("INVDIFF_BACKEND", "nonexistent")
    with pytest.raises(BackendError) as info:
        ops.invariant_loss(PRED, TARGET, W, 1.0)
    msg = str(info.value)
    assert "INVDIFF_BACKEND" in msg and "nonexistent" in msg and "reference" in msg
    with pytest.raises(BackendError, match="nonexistent"):
        ops.guidance_combine(PRED, TARGET, 2.0)


def test_forced_backend_that_declines_says_why(monkeypatch):
    monkeypatch.setenv("INVDIFF_BACKEND", "reference")
    x = torch.ones(2, 1, 2, 2, dtype=torch.int64)
    with pytest.raises(BackendError, match=r"cannot run guidance_combine.*dtype torch.int64 not supported"):
        ops.guidance_combine(x, x, 2.0)


def test_unforced_dispatch_with_no_backend_lists_reasons():
    x = torch.ones(2, 1, 2, 2, dtype=torch.int32)
    with pytest.raises(BackendError, match=r"no backend can run invariant_loss.*reference.*int32"):
        ops.invariant_loss(x, x, torch.ones(2, 1), 1.0)


def test_backend_table_lists_reference():
    rows = {r["backend"]: r for r in ops.backend_table()}
    assert rows["reference"]["available"] == "yes"
    assert set(rows["reference"]["ops"].split(",")) == {
        "guidance_combine", "cfg_combine", "invariant_loss", "invariant_loss_with_stats", "guided_step"
    }


# ----------------------------------------------------------------------------- cfg


def test_cfg_combine_scalar_scale():
    uncond = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    cond = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # uncond + 3 * (cond - uncond)
    expected = torch.tensor([[4.0, -4.0], [3.0, 5.0]])
    assert torch.equal(ops.cfg_combine(uncond, cond, 3.0), expected)
    assert torch.equal(ops.cfg_combine(uncond, cond, 1.0), cond)
    assert torch.equal(ops.cfg_combine(uncond, cond, 0.0), uncond)
    assert torch.equal(ops.cfg_combine(uncond, cond, torch.tensor(3.0)), expected)  # 0-dim tensor


def test_cfg_combine_per_sample_scale():
    gen = torch.Generator().manual_seed(0)
    uncond = torch.randn(3, 2, 4, 4, generator=gen)
    cond = torch.randn(3, 2, 4, 4, generator=gen)
    scale = torch.tensor([0.0, 1.0, 7.5])
    out = ops.cfg_combine(uncond, cond, scale)
    assert out.shape == uncond.shape
    assert torch.equal(out[0], uncond[0])
    torch.testing.assert_close(out[1], cond[1], rtol=0, atol=1e-6)  # u + 1*(c-u) rounds once
    torch.testing.assert_close(out[2], uncond[2] + 7.5 * (cond[2] - uncond[2]))
    # a float64 scale vector keeps the images' dtype
    assert ops.cfg_combine(uncond, cond, scale.double()).dtype == torch.float32
