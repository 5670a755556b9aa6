import pytest

from tests.utils import kernel_device


@pytest.fixture()
def triton_backend(monkeypatch):
    """Force the Triton backend for invdiff.ops, and return the device its tensors go on."""
    monkeypatch.setenv("INVDIFF_BACKEND", "triton")
    return kernel_device()


@pytest.fixture()
def tuning(monkeypatch):
    """Lower the kernels' launch knobs for one test, e.g. tuning(block=16, interpreter_programs=8),
    so that small interpreter-sized tensors still take the multi-split, multi-iteration paths."""
    from invdiff.kernels.utils import TUNING

    def set_knobs(**knobs):
        for key, value in knobs.items():
            assert key in TUNING, f"unknown knob {key}"
            monkeypatch.setitem(TUNING, key, value)

    return set_knobs
