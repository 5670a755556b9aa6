"""Min-step step time with and without the frozen-prediction bank, side by side (`make bench`).

The bank (environments.FrozenBank) replaces the frozen UNet's forward on every step by a lookup
of its prediction on the max step's fixed draws. Both providers train the same G_psi on the same
data with the same batch size; only where eps_frozen comes from differs.
"""
import pytest
import torch

from invdiff.data import colored_digits
from invdiff.environments import collect_losses
from invdiff.models.base import FrozenBase, base_unet_config, default_scheduler
from invdiff.models.conditioner import PromptEmbedding
from invdiff.models.guidance import GuidanceModule
from invdiff.training import MinStepConfig, train_guidance

STEPS = 10


@pytest.fixture(scope="module")
def setup():
    from diffusers import UNet2DConditionModel

    data = colored_digits("train", p=0.9)
    data = data.subset(torch.arange(0, len(data), 4))
    torch.manual_seed(0)
    base = FrozenBase(
        UNet2DConditionModel(**base_unet_config()), PromptEmbedding(prompts=data.prompts), default_scheduler()
    ).freeze()
    _, _, bank = collect_losses(base, data, num_timesteps=20, draws=1, progress=False, return_bank=True)
    weights = torch.rand(len(data), 2)
    return base, data, bank, weights


@pytest.mark.parametrize("provider", ["fresh-frozen-forward", "frozen-bank"])
def test_min_step(benchmark, setup, provider):
    base, data, bank, weights = setup
    cfg = MinStepConfig(steps=STEPS, batch_size=128, lr=1e-2, lam_mode="absolute")

    def run():
        g = GuidanceModule.from_frozen(base.unet.config)
        train_guidance(base, g, data, weights, cfg, progress=False, bank=bank if provider == "frozen-bank" else None)

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["steps_per_round"] = STEPS
