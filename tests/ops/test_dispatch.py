"""Dispatch between the Triton kernels and the reference: who takes what, why not, forcing,
torch.compile tracing, and the min-step trainer going through the fused op."""
import pytest
import torch

from invdiff import ops
from invdiff.ops import BackendError, reference
from tests.utils import kernel_device

X = torch.randn(2, 3, 4, 4)
W = torch.rand(2, 2)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("INVDIFF_BACKEND", raising=False)


def test_triton_is_registered_ahead_of_the_reference():
    names = [b.name for b in ops.BACKENDS]
    assert names.index("triton") < names.index("reference")
    triton = ops.BACKENDS[names.index("triton")]
    assert triton.available, triton.unavailable_reason  # triton is a test dependency


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["interpreter", "no_interpreter"])
def test_cpu_tensors_take_the_reference_unless_triton_is_forced(monkeypatch, interpret):
    """The interpreter is a test vehicle: plain dispatch must not route CPU training through it,
    and the reason says how to force it, with or without TRITON_INTERPRET (a CUDA machine runs
    this file without it: gpu_check.sh's interpreter_suite)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert ops.select_backend("invariant_loss", [X, X], [W]).name == "reference"
    triton = next(b for b in ops.BACKENDS if b.name == "triton")
    reasons = triton.not_supported_reasons("invariant_loss", [X, X], [W])
    assert any("INVDIFF_BACKEND=triton" in r for r in reasons), reasons


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("INVDIFF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        ops.invariant_loss(X, X, W)


@pytest.mark.parametrize(
    "inputs, aux, reason",
    [
        ((X.double(), X.double()), (W,), "dtype torch.float64 not supported"),
        ((X, X.half()), (W,), "mixed dtypes"),
        ((X, X[:, :2]), (W,), "shapes differ"),
        ((X, X), (torch.ones(2, 2000),), "groups"),
        ((X, X), (torch.ones(2, 2, dtype=torch.int64),), "floating-point"),
    ],
    ids=["fp64", "mixed_dtypes", "broadcast", "too_many_groups", "integer_weights"],
)
def test_triton_says_why_it_declines(monkeypatch, inputs, aux, reason):
    monkeypatch.setenv("INVDIFF_BACKEND", "triton")
    triton = next(b for b in ops.BACKENDS if b.name == "triton")
    reasons = triton.not_supported_reasons("invariant_loss", inputs, aux, forced=True)
    assert any(reason in r for r in reasons), reasons
    with pytest.raises(BackendError, match="INVDIFF_BACKEND=triton cannot run"):
        select = ops.select_backend("invariant_loss", inputs, aux)
        assert select is None


def test_unforced_dispatch_falls_back_to_the_reference_for_what_triton_declines():
    assert ops.select_backend("guidance_combine", [X.double(), X.double()]).name == "reference"
    out = ops.guidance_combine(X, X[:1], 2.0)  # broadcasting: only the reference does it
    torch.testing.assert_close(out, X + 2.0 * X[:1])


def test_backend_table_lists_triton_with_its_dtypes():
    rows = {r["backend"]: r for r in ops.backend_table()}
    assert rows["triton"]["available"] == "yes"
    assert "bfloat16" in rows["triton"]["dtypes"] and "float64" not in rows["triton"]["dtypes"]
    assert "invariant_loss" in rows["triton"]["ops"] and "cfg_combine" in rows["triton"]["ops"]


def test_torch_compile_traces_the_fused_ops_in_one_graph(monkeypatch):
    """The kernels are torch.library custom ops with fake implementations, inside an
    autograd.Function: a compiled min step traces them without graph breaks (fullgraph=True)."""
    monkeypatch.setenv("INVDIFF_BACKEND", "triton")
    torch._dynamo.reset()
    device = kernel_device()
    gen = torch.Generator().manual_seed(0)
    eps, target = (torch.randn(3, 2, 5, 5, generator=gen).to(device) for _ in range(2))
    weights = torch.rand(3, 2, generator=gen).to(device)

    def step(g):
        combined = ops.guidance_combine(eps, g, 2.0)
        return ops.invariant_loss(eps, target, weights, 1.5, g=g, ratio=2.0) + combined.mean()

    g = torch.randn(3, 2, 5, 5, generator=gen).to(device).requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(g)
    loss.backward()
    g_ref = g.detach().double().requires_grad_()
    ref = reference.invariant_loss(eps.double(), target.double(), weights.double(), 1.5, g=g_ref, ratio=2.0)
    ref = ref + reference.guidance_combine(eps.double(), g_ref, 2.0).mean()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.grad.double(), g_ref.grad, rtol=1e-5, atol=1e-6)


def test_custom_ops_pass_torch_library_opcheck():
    """torch.library.opcheck: schemas, fake implementations and autograd registration agree."""
    from invdiff.kernels import guidance_combine, invariant_loss  # noqa: F401  (registers the ops)

    device = kernel_device()
    x, y = torch.randn(2, 3, 4, device=device), torch.randn(2, 3, 4, device=device)
    w = torch.rand(2, 3, device=device)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.invdiff.axpby.default, (x, y, 1.0, 2.0, None), test_utils=checks)
    torch.library.opcheck(torch.ops.invdiff.invariant_loss_fwd.default, (x, y, x, w, 1.0, 1.0, 2.0), test_utils=checks)
    coeff = torch.rand(2, device=device)
    grad = torch.tensor(1.0, device=device)
    torch.library.opcheck(
        torch.ops.invdiff.invariant_loss_bwd.default, (grad, x, y, x, coeff, 1.0, 2.0, False, True, False), test_utils=checks
    )


def test_min_step_trainer_runs_through_the_fused_op(monkeypatch, frozen_tiny_base, tiny_train):
    """Two min steps with the Triton backend forced give the reference run's log: the trainer
    calls the op, and nothing else in it depends on which backend ran."""
    from invdiff.models.guidance import GuidanceModule
    from invdiff.training import MinStepConfig, train_guidance

    from invdiff.kernels import invariant_loss as kernel

    calls = []
    original = kernel.InvariantLoss.apply

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    config = MinStepConfig(steps=2, batch_size=8, lr=1e-2, lam=1.0, lam_mode="absolute", seed=0)
    weights = torch.rand(len(tiny_train), 2, generator=torch.Generator().manual_seed(0))
    logs = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("INVDIFF_BACKEND", backend)
        if backend == "triton":
            monkeypatch.setattr(kernel.InvariantLoss, "apply", spy)
        torch.manual_seed(0)
        g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, preset="tiny", ratio=2.0)
        logs[backend] = train_guidance(frozen_tiny_base, g, tiny_train, weights, config, progress=False)
    assert len(calls) == 2
    for ref_row, fused_row in zip(logs["reference"][:-1], logs["triton"][:-1]):
        for key in ("loss", "mean_risk", "var_risk"):
            assert fused_row[key] == pytest.approx(ref_row[key], rel=1e-4, abs=1e-7), key
