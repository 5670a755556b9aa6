"""The fused invariant loss against the fp64 reference: loss, grad_g, grad_eps, grad_target and
grad_weights, on a grid of named edge cases in fp32, bf16 and fp16 (DESIGN.md's tolerance rule)."""
import pytest
import torch

from invdiff import ops
from invdiff.ops import reference
from tests.utils import compare_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name: (B, sample shape, K, lam, ratio or None for a plain prediction, weight pattern)
CASES = {
    "non_pow2_D": (4, (3, 5, 7), 3, 1.0, 2.0, "random"),
    "batch_of_1": (1, (4, 6, 6), 2, 1.0, 2.0, "random"),
    "one_group": (6, (3, 4, 4), 1, 1.0, 2.0, "random"),
    "K_equals_B": (5, (3, 4, 4), 5, 1.0, 2.0, "one_hot"),
    "empty_group_in_batch": (6, (3, 4, 4), 3, 1.0, 2.0, "empty_middle"),
    "all_groups_empty_but_one": (6, (3, 4, 4), 4, 1.0, 2.0, "only_first"),
    "lambda_zero": (6, (3, 4, 4), 3, 0.0, 2.0, "random"),
    "interpolation_branch": (6, (3, 4, 4), 3, 3.0, 0.4, "random"),
    "residual_branch": (6, (3, 4, 4), 3, 3.0, 1.5, "random"),
    "ratio_exactly_1": (4, (3, 4, 4), 2, 1.0, 1.0, "random"),
    "plain_prediction": (6, (3, 4, 4), 3, 2.0, None, "random"),
}


def _weights(b, k, pattern, gen):
    if pattern == "random":
        return torch.rand(b, k, generator=gen)
    if pattern == "one_hot":
        return torch.eye(b, k)
    w = torch.rand(b, k, generator=gen)
    if pattern == "empty_middle":
        w[:, 1] = 0.0
    elif pattern == "only_first":
        w[:, 1:] = 0.0
    return w


def _case_inputs(case, dtype, device, seed=0, grads=("g", "pred")):
    b, shape, k, lam, ratio, pattern = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, *shape, generator=gen).to(dtype).to(device).requires_grad_("pred" in grads)
    target = torch.randn(b, *shape, generator=gen).to(dtype).to(device).requires_grad_("target" in grads)
    g = (0.3 * torch.randn(b, *shape, generator=gen)).to(dtype).to(device).requires_grad_("g" in grads)
    weights = _weights(b, k, pattern, gen).to(device)
    return pred, target, g, weights, lam, ratio


def _loss_fns(lam, ratio):
    if ratio is None:
        return (lambda p, t, g, w: ops.invariant_loss(p, t, w, lam),
                lambda p, t, g, w: reference.invariant_loss(p, t, w, lam))
    return (lambda p, t, g, w: ops.invariant_loss(p, t, w, lam, g=g, ratio=ratio),
            lambda p, t, g, w: reference.invariant_loss(p, t, w, lam, g=g, ratio=ratio))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_match_the_fp64_reference(triton_backend, case, dtype):
    pred, target, g, weights, lam, ratio = _case_inputs(case, dtype, triton_backend)
    if ratio is None:
        g = g.detach()
    fast, ref = _loss_fns(lam, ratio)
    compare_to_reference(fast, ref, [pred, target, g, weights], name=case)


@pytest.mark.parametrize("grad_output", [-1.7, 0.0, 3.0])
def test_upstream_gradient_scales_every_gradient(triton_backend, grad_output):
    pred, target, g, weights, lam, ratio = _case_inputs("non_pow2_D", torch.float32, triton_backend, grads=("g", "pred", "target"))
    fast, ref = _loss_fns(lam, ratio)
    compare_to_reference(fast, ref, [pred, target, g, weights], grad_output=torch.tensor(grad_output, dtype=torch.float64), name="grad_out")


def test_gradient_of_the_weights_matches_the_reference(triton_backend):
    pred, target, g, weights, lam, ratio = _case_inputs("empty_group_in_batch", torch.float32, triton_backend, grads=("g",))
    fast, ref = _loss_fns(lam, ratio)
    compare_to_reference(fast, ref, [pred, target, g, weights.requires_grad_()], name="grad_weights")


def test_only_the_gradients_autograd_asks_for_are_formed(triton_backend):
    """The trainer's case: eps is frozen, only G's output needs a gradient."""
    pred, target, g, weights, lam, ratio = _case_inputs("non_pow2_D", torch.bfloat16, triton_backend, grads=("g",))
    ops.invariant_loss(pred, target, weights, lam, g=g, ratio=ratio).backward()
    assert g.grad is not None and g.grad.dtype == torch.bfloat16 and g.grad.shape == g.shape
    assert pred.grad is None and target.grad is None


@pytest.mark.parametrize("case", ["non_pow2_D", "batch_of_1", "empty_group_in_batch"])
def test_split_reduction_and_looping_group_kernel(triton_backend, tuning, case):
    """Several splits per sample, several loop iterations per split, and a group kernel that walks
    the batch in several tiles: the paths large SD-sized inputs take on a GPU."""
    tuning(block=16, interpreter_programs=64, group_tile=4)
    from invdiff.kernels.utils import split_plan

    pred, target, g, weights, lam, ratio = _case_inputs(case, torch.float32, triton_backend)
    plan = split_plan(pred.shape[0], pred[0].numel(), pred.device)
    assert plan.splits > 1 and plan.chunk >= plan.block
    fast, ref = _loss_fns(lam, ratio)
    compare_to_reference(fast, ref, [pred, target, g, weights], name=f"split/{case}")


@pytest.mark.parametrize("case", ["non_pow2_D", "batch_of_1", "empty_group_in_batch", "one_group"])
def test_the_group_reduction_in_the_last_program_equals_its_own_launch(triton_backend, tuning, case):
    """The forward's group reduction runs in whichever pass-1 program takes the last ticket
    (fuse_group, the default) or as a second launch: the same arithmetic in the same order, so
    bitwise the same loss, statistics and gradients, and the second path still matches the
    reference."""
    tuning(block=16, interpreter_programs=64, group_tile=4)
    pred, target, g, weights, lam, ratio = _case_inputs(case, torch.float32, triton_backend)
    results = []
    for fuse in (True, False):
        tuning(fuse_group=fuse)
        g.grad = pred.grad = None
        stats = ops.invariant_loss_with_stats(pred, target, weights, lam, g=g, ratio=ratio)
        stats.loss.backward()
        results.append([t.detach().clone() for t in stats] + [g.grad.clone(), pred.grad.clone()])
    for fused, launched in zip(*results):
        assert torch.equal(fused, launched)
    fast, ref = _loss_fns(lam, ratio)
    compare_to_reference(fast, ref, [pred, target, g, weights], name=f"group kernel/{case}")


def test_non_contiguous_inputs(triton_backend):
    """A strided batch slice (used in place) and a channels-last tensor (copied) give the same
    loss and gradients as their contiguous copies."""
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(8, 3, 5, 7, generator=gen).to(triton_backend)
    pred = big[::2].requires_grad_(False)  # rows 0, 2, 4, 6: row stride 2*D
    target = torch.randn(4, 5, 7, 3, generator=gen).to(triton_backend).permute(0, 3, 1, 2)  # not row-contiguous
    g = torch.randn(4, 3, 5, 7, generator=gen).to(triton_backend).contiguous(memory_format=torch.channels_last)
    g.requires_grad_()
    weights = torch.rand(7, 4, generator=gen).to(triton_backend).t()  # (4, 7) with strides (1, 4)
    assert not pred.is_contiguous() and not target.is_contiguous() and not g.is_contiguous()
    fast, ref = _loss_fns(1.0, 2.0)
    compare_to_reference(fast, ref, [pred, target, g, weights], name="non_contiguous")


def test_stats_match_the_reference(triton_backend):
    pred, target, g, weights, lam, ratio = _case_inputs("empty_group_in_batch", torch.float32, triton_backend)
    fast = ops.invariant_loss_with_stats(pred, target, weights, lam, g=g, ratio=ratio)
    ref = reference.invariant_loss_with_stats(pred.double(), target.double(), weights.double(), lam, g=g.double(), ratio=ratio)
    for field in ("loss", "per_sample", "risks", "weight_sums"):
        torch.testing.assert_close(getattr(fast, field).double(), getattr(ref, field), rtol=1e-5, atol=1e-6, msg=field)
    assert not fast.per_sample.requires_grad and fast.loss.requires_grad
    assert fast.weight_sums[1] == 0 and fast.risks[1] == 0  # the empty group is reported as such


def test_deterministic(triton_backend, tuning):
    tuning(block=16, interpreter_programs=16)
    pred, target, g, weights, lam, ratio = _case_inputs("non_pow2_D", torch.float32, triton_backend, grads=("g",))
    results = []
    for _ in range(2):
        g.grad = None
        loss = ops.invariant_loss(pred, target, weights, lam, g=g, ratio=ratio)
        loss.backward()
        results.append((loss.detach().clone(), g.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_bad_inputs_raise_clear_errors(triton_backend):
    pred, target, g, weights, lam, ratio = _case_inputs("non_pow2_D", torch.float32, triton_backend)
    with pytest.raises(ValueError, match="lambda"):
        ops.invariant_loss(pred, target, weights, -1.0, g=g, ratio=ratio)
    with pytest.raises(ValueError, match="both g and ratio"):
        ops.invariant_loss(pred, target, weights, 1.0, g=g)
    with pytest.raises(ValueError, match=r"weights must be \(B, K\)"):
        ops.invariant_loss(pred, target, weights[:2], 1.0, g=g, ratio=ratio)
    with pytest.raises(ValueError, match="r must be > 0"):
        ops.invariant_loss(pred, target, weights, 1.0, g=g, ratio=0.0)
