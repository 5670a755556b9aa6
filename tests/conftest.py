import copy
import os

import torch

# The Triton kernels run on CPU tensors in Triton's interpreter. Triton reads this when a kernel
# is defined, so it is set before anything imports invdiff.kernels. On a CUDA machine the kernel
# tests run on the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.utils import make_tiny_sd_folder, tiny_base, tiny_dataset, train_tiny_base, write_tiny_imagefolder

# The test machine has 2 cores and usually something else running: one thread keeps every test
# small and the timings stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _small_calibration(monkeypatch):
    """Every debias run calibrates its push (invdiff/calibration.py) by sampling 32 images per
    prompt at 5 strengths with 25 steps: minutes on this CPU for each of the suite's many tiny
    runs. The suite samples 4 per prompt at 2 strengths with 2 steps; tests/test_calibration.py
    checks the procedure itself."""
    import invdiff.calibration as calibration

    monkeypatch.setattr(calibration, "CALIBRATION_STRENGTHS", (1.0, 2.0))
    monkeypatch.setattr(calibration, "CALIBRATION_SAMPLES", 4)
    monkeypatch.setattr(calibration, "CALIBRATION_STEPS", 2)


@pytest.fixture(scope="session")
def _tiny_base_model():
    return train_tiny_base(steps=2)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, _tiny_base_model):
    """The 2-step tiny base model, saved once per session (a folder path)."""
    return tiny_base(tmp_path_factory.mktemp("tiny_base"), base=_tiny_base_model)


@pytest.fixture()
def frozen_tiny_base(_tiny_base_model):
    """A private copy of the in-memory tiny base (the same weights as `tiny_base_dir`)."""
    return copy.deepcopy(_tiny_base_model).freeze()


@pytest.fixture(scope="session")
def tiny_train():
    """The 72-image colored-digits subset the tiny base was trained on (with attributes)."""
    return tiny_dataset()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion folder (tests/utils.make_tiny_sd_folder), built once per session.
    Tests read it; a test that changes a folder builds its own."""
    return make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd") / "sd"))


@pytest.fixture(scope="session")
def tiny_sd_data(tmp_path_factory):
    """A biased two-prompt imagefolder of 16-pixel images (tests/utils.write_tiny_imagefolder)."""
    return write_tiny_imagefolder(str(tmp_path_factory.mktemp("sd_data") / "data"))


def pytest_collection_modifyitems(config, items):
    """INVDIFF_HYPOTHESIS_MAX_EXAMPLES=N caps every Hypothesis test at N examples.

    benchmarks/gpu_check.sh runs the interpreter-tested kernel suite on a lent GPU, where the
    minutes are few; the fuzz tests pin their own max_examples (a profile cannot lower an explicit
    setting), so the cap is applied to each collected test's settings here."""
    cap = os.environ.get("INVDIFF_HYPOTHESIS_MAX_EXAMPLES")
    if not cap:
        return
    from hypothesis import settings

    for item in items:
        test = getattr(item, "obj", None)
        current = getattr(test, "_hypothesis_internal_use_settings", None)
        if current is not None and current.max_examples > int(cap):
            test._hypothesis_internal_use_settings = settings(current, max_examples=int(cap))
