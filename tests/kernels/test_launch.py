"""How the Triton kernels are launched (issue 14): every launch under its tensors' device guard,
grid dimension 1 within CUDA's 65535 cap, and no host sync anywhere in the ops, so that a
training step can be captured in one CUDA graph."""
import contextlib

import pytest
import torch

from invdiff import ops
from invdiff.ops import reference
from tests.utils import compare_to_reference

KERNEL_NAMES = {
    "guidance_combine": ("_axpby_fwd_kernel", "_axpby_bwd_kernel"),
    "invariant_loss": ("_sq_partial_kernel", "_group_kernel", "_grad_kernel"),
}


class _KernelSpy:
    """Stands in for a @triton.jit kernel: records each launch's grid and the device guards
    active at the launch, then launches the real kernel."""

    def __init__(self, name, kernel, record):
        self.name, self.kernel, self.record = name, kernel, record

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.record["launches"].append((self.name, tuple(grid), list(self.record["guards"])))
            self.record["num_warps"].append((self.name, kwargs.get("num_warps")))
            return launch(*args, **kwargs)

        return run


@pytest.fixture()
def launches(monkeypatch):
    """Spy on every kernel launch and on utils.launch_device. Returns a dict whose "launches" are
    (kernel name, grid, devices of the guards active at launch) and "guards" the active guards."""
    from invdiff.kernels import guidance_combine, invariant_loss, utils

    record = {"launches": [], "guards": [], "num_warps": []}
    real_guard = getattr(utils, "launch_device", None)

    @contextlib.contextmanager
    def recording_guard(where):
        device = where.device if torch.is_tensor(where) else torch.device(where)
        with real_guard(where):
            record["guards"].append(device)
            try:
                yield
            finally:
                record["guards"].pop()

    # raising=False: before issue 14's fix there was no guard to patch, and the launches below
    # must then fail on the missing guard, not on the patching.
    monkeypatch.setattr(utils, "launch_device", recording_guard, raising=False)
    for module, names in ((guidance_combine, KERNEL_NAMES["guidance_combine"]),
                          (invariant_loss, KERNEL_NAMES["invariant_loss"])):
        for name in names:
            monkeypatch.setattr(module, name, _KernelSpy(name, getattr(module, name), record))
    return record


def _randn(*shape, device, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device).requires_grad_(requires_grad)


def _run_every_kernel(device):
    """Forward and backward of the three ops, which between them launch every kernel (the
    separate group kernel only with TUNING["fuse_group"] off)."""
    x, y = _randn(3, 2, 5, 7, device=device), _randn(3, 2, 5, 7, device=device, seed=1)
    ops.guidance_combine(x, y, 2.0).sum().backward()
    w = torch.tensor([0.5, 2.0, 7.5], device=device, requires_grad=True)
    ops.cfg_combine(x, y, w).sum().backward()
    target = _randn(3, 2, 5, 7, device=device, seed=2, requires_grad=False)
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(3)).to(device)
    ops.invariant_loss(x, target, weights, 1.0, g=y, ratio=2.0).backward()


# ----------------------------------------------------------------------------- device guard


def test_launch_device_is_a_cuda_guard_for_cuda_and_a_null_context_otherwise():
    """A torch.device("cuda", 1) can be built without a GPU; the guard is not entered here."""
    from invdiff.kernels.utils import launch_device

    for where in (torch.device("cuda", 1), "cuda:1"):
        guard = launch_device(where)
        assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch_device(torch.empty(2)), contextlib.nullcontext)
    assert isinstance(launch_device(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize("fuse_group", [True, False], ids=["fused_group", "group_kernel"])
def test_every_kernel_launch_runs_under_its_tensors_device_guard(triton_backend, tuning, launches, fuse_group):
    tuning(fuse_group=fuse_group)
    _run_every_kernel(triton_backend)
    names = {name for name, _, _ in launches["launches"]}
    expected = set(KERNEL_NAMES["guidance_combine"]) | set(KERNEL_NAMES["invariant_loss"])
    assert names == (expected - {"_group_kernel"} if fuse_group else expected)
    for name, _, guards in launches["launches"]:
        assert len(guards) == 1 and guards[0].type == triton_backend.type, (
            f"{name} launched outside a device guard (guards active: {guards})")
    assert launches["guards"] == []


def test_the_group_kernel_runs_with_pass_1s_num_warps(triton_backend, tuning, launches):
    """The group reduction as its own launch and folded into pass 1 promise bitwise the same
    results; a tile's reduction order follows the warp count, so the separate launch must use the
    plan's num_warps, which pass 1 runs with. (The interpreter ignores num_warps, so only the
    launch arguments show it here; gpu_correctness.py compares the bits on a GPU.)"""
    tuning(fuse_group=False)
    _run_every_kernel(triton_backend)
    warps = dict(launches["num_warps"])
    assert warps["_group_kernel"] == warps["_sq_partial_kernel"] is not None, warps


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_second_gpu_without_set_device(monkeypatch):
    """The bug itself: with cuda:0 current, tensors on cuda:1 used to launch on cuda:0."""
    monkeypatch.setenv("INVDIFF_BACKEND", "triton")
    assert torch.cuda.current_device() == 0
    device = torch.device("cuda", 1)
    x, y = _randn(4, 3, 5, 7, device=device), _randn(4, 3, 5, 7, device=device, seed=1)
    compare_to_reference(lambda a, b: ops.guidance_combine(a, b, 2.0),
                         lambda a, b: reference.guidance_combine(a, b, 2.0), [x, y], name="cuda:1 combine")
    target = _randn(4, 3, 5, 7, device=device, seed=2, requires_grad=False)
    weights = torch.rand(4, 3, device=device)
    compare_to_reference(lambda p, t, g, w: ops.invariant_loss(p, t, w, 1.0, g=g, ratio=2.0),
                         lambda p, t, g, w: reference.invariant_loss(p, t, w, 1.0, g=g, ratio=2.0),
                         [x, target, y, weights], name="cuda:1 loss")
    assert torch.cuda.current_device() == 0  # the guard restored it


# ----------------------------------------------------------------------------- grid dimensions


def test_row_grid_keeps_dimension_1_within_the_cuda_cap():
    """At the real cap and block: a row of 65535 * 2048 + 1 elements used to need 65536
    programs on dimension 1."""
    from invdiff.kernels.utils import MAX_GRID_DIM, TUNING, row_grid

    assert MAX_GRID_DIM == 65535
    block = TUNING["block"]
    for length in (1, 17, block, 65535 * block, 65535 * block + 1, 3 * 65535 * block + 5, 2**30 + 3):
        (rows, per_row), blk, chunk = row_grid(70000, length)
        assert rows == 70000  # rows stay on dimension 0, whose cap is 2**31 - 1
        assert per_row <= MAX_GRID_DIM and chunk % blk == 0
        assert (per_row - 1) * chunk < length <= per_row * chunk  # every element, no idle program
        if length <= 65535 * block:
            assert chunk == blk  # the common case does not loop
    with pytest.raises(ValueError, match="int32"):  # the last chunk's offsets would wrap around
        row_grid(1, 2**31 - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_combine_loops_when_the_grid_cap_is_reached(triton_backend, tuning, launches, monkeypatch, dtype):
    """MAX_GRID_DIM lowered to 2 with 16-element blocks: each program walks several blocks, the
    path rows over ~134M elements take on a GPU. Forward and backward against the reference."""
    from invdiff.kernels import utils

    tuning(block=16)
    monkeypatch.setattr(utils, "MAX_GRID_DIM", 2, raising=False)
    x = _randn(3, 3, 5, 7, device=triton_backend).to(dtype).detach().requires_grad_()  # D = 105: 7 blocks
    y = _randn(3, 3, 5, 7, device=triton_backend, seed=1).to(dtype).detach().requires_grad_()
    compare_to_reference(lambda a, b: ops.guidance_combine(a, b, 2.0),
                         lambda a, b: reference.guidance_combine(a, b, 2.0), [x, y], name="combine, capped grid")
    w = torch.tensor([0.5, 2.0, 7.5], device=triton_backend, requires_grad=True)
    compare_to_reference(ops.cfg_combine, reference.cfg_combine, [x, y, w], name="cfg, capped grid")
    grids = [grid for name, grid, _ in launches["launches"]]
    assert grids and all(grid == (3, 2) for grid in grids), grids


@pytest.mark.parametrize("fuse_group", [True, False], ids=["fused_group", "group_kernel"])
def test_loss_grids_put_rows_on_dimension_0_within_the_cap(triton_backend, tuning, launches, monkeypatch, fuse_group):
    from invdiff.kernels import utils

    tuning(block=16, interpreter_programs=64, fuse_group=fuse_group)
    monkeypatch.setattr(utils, "MAX_GRID_DIM", 2, raising=False)
    pred = _randn(5, 3, 5, 7, device=triton_backend)
    g = _randn(5, 3, 5, 7, device=triton_backend, seed=1)
    target = _randn(5, 3, 5, 7, device=triton_backend, seed=2)
    weights = torch.rand(5, 3, generator=torch.Generator().manual_seed(3)).to(triton_backend)
    compare_to_reference(lambda p, t, gg, w: ops.invariant_loss(p, t, w, 1.0, g=gg, ratio=2.0),
                         lambda p, t, gg, w: reference.invariant_loss(p, t, w, 1.0, g=gg, ratio=2.0),
                         [pred, target, g, weights], name="loss, capped grid")
    grids = {name: grid for name, grid, _ in launches["launches"]}
    assert grids["_sq_partial_kernel"] == grids["_grad_kernel"] == (5, 2)
    assert grids.get("_group_kernel") == (None if fuse_group else (1,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: 3 x 268 MB bf16 rows")
def test_a_row_past_65535_blocks_on_the_gpu(monkeypatch):
    monkeypatch.setenv("INVDIFF_BACKEND", "triton")
    length = 65535 * 2048 + 4099
    x = torch.randn(1, length, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(1, length, device="cuda", dtype=torch.bfloat16)
    out = ops.guidance_combine(x, y, 2.0)
    torch.testing.assert_close(out, (x.float() + 2.0 * y.float()).to(torch.bfloat16), rtol=0, atol=0)
    assert out[0, -4099:].abs().sum() > 0  # the tail past 65535 blocks was written


# ----------------------------------------------------------------------------- no host sync


@pytest.fixture()
def no_host_sync(monkeypatch):
    """Make every Tensor method that reads a value back to the host raise while the block runs.
    (Triton's interpreter copies whole storages, not tensors, so it is unaffected.)"""

    @contextlib.contextmanager
    def forbid():
        with monkeypatch.context() as m:
            for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"):
                def refuse(self, *args, _method=method, **kwargs):
                    raise AssertionError(f"host sync: Tensor.{_method} called")
                m.setattr(torch.Tensor, method, refuse)
            yield

    return forbid


def test_forward_and_backward_never_sync_with_the_host(triton_backend, no_host_sync):
    """What CUDA-graph capture of a training step needs: no .item(), no data-dependent shape, no
    copy to the host, in any op's Python or its backward."""
    x, y = _randn(3, 2, 5, 7, device=triton_backend), _randn(3, 2, 5, 7, device=triton_backend, seed=1)
    target = _randn(3, 2, 5, 7, device=triton_backend, seed=2, requires_grad=False)
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(3)).to(triton_backend).requires_grad_()
    w = torch.tensor([0.5, 2.0, 7.5], device=triton_backend, requires_grad=True)
    with no_host_sync():
        loss = ops.invariant_loss(ops.guidance_combine(x, y, 0.5), target, weights, 1.0, g=ops.cfg_combine(x, y, w), ratio=2.0)
        loss.backward()
    assert x.grad is not None and y.grad is not None and w.grad is not None and weights.grad is not None


def test_the_ops_trace_into_one_graph_forward_and_backward(triton_backend):
    """torch.compile(fullgraph=True) fails on any graph break, which a host sync in the Python
    around the kernels (dispatch, argument checks, the autograd.Function) would cause. aot_eager
    also traces the backward. The custom ops' bodies are opaque to it: the test above covers them."""
    import torch._dynamo

    def step(x, y, target, weights, w):
        eps = ops.cfg_combine(x, y, w)
        return ops.invariant_loss(x, target, weights, 1.0, g=ops.guidance_combine(eps, y, 0.5), ratio=2.0)

    x, y = _randn(3, 2, 5, 7, device=triton_backend), _randn(3, 2, 5, 7, device=triton_backend, seed=1)
    target = _randn(3, 2, 5, 7, device=triton_backend, seed=2, requires_grad=False)
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(3)).to(triton_backend)
    w = torch.tensor([0.5, 2.0, 7.5], device=triton_backend, requires_grad=True)
    torch._dynamo.reset()
    try:
        loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y, target, weights, w)
        loss.backward()
    finally:
        torch._dynamo.reset()
    grads = [t.grad.clone() for t in (x, y, w)]
    for t in (x, y, w):
        t.grad = None
    eager = step(x, y, target, weights, w)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for got, t in zip(grads, (x, y, w)):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fuse_group", [True, False], ids=["fused_group", "group_kernel"])
def test_a_loss_step_captures_in_one_cuda_graph(monkeypatch, tuning, fuse_group):
    """Forward and backward of the min-step loss captured once (PyTorch's whole-network capture
    recipe), then replayed on new data: the same loss and gradient as eager each time."""
    monkeypatch.setenv("INVDIFF_BACKEND", "triton")
    tuning(fuse_group=fuse_group)
    x = torch.randn(8, 4, 16, 16, device="cuda")
    g = torch.randn(8, 4, 16, 16, device="cuda", requires_grad=True)
    target = torch.randn(8, 4, 16, 16, device="cuda")
    weights = torch.rand(8, 3, device="cuda")

    def step():
        loss = ops.invariant_loss(x, target, weights, 1.0, g=g, ratio=2.0)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernels before capture
        for _ in range(2):
            g.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    g.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            for t in (x, g, target):
                t.copy_(torch.randn(t.shape, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        expected_g = g.detach().clone().requires_grad_()
        expected = ops.invariant_loss(x, target, weights, 1.0, g=expected_g, ratio=2.0)
        expected.backward()
        torch.testing.assert_close(static_loss, expected)
        torch.testing.assert_close(g.grad, expected_g.grad)
