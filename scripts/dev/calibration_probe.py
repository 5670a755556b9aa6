"""Development run (issue 21): can a run read its own output's minority share without labels?

    OMP_NUM_THREADS=2 python scripts/dev/calibration_probe.py OUT_DIR P SEED [STRENGTH ...]

Trains the default InvDiff on colored digits (2 colours, the shipped base at p), samples 40 per
digit at each strength, and compares, per strength, the true majority share (the colour probe,
evaluation only) with a label-free proxy: the frozen model's loss score of each *generated*
image, standardised with the training data's per-(prompt, t) statistics and cut at the training
groups' per-prompt threshold. Writes OUT_DIR/probe_p{P}_s{SEED}.json.
"""
import json
import os
import sys
import time

import torch

ROOT = __file__.rsplit("/scripts/", 1)[0]
sys.path.insert(0, ROOT)

import invdiff.demo as demo  # noqa: E402
from invdiff.data.base import DiffusionDataset  # noqa: E402
from invdiff.environments import collect_losses, spread_weights  # noqa: E402
from invdiff.metrics import group_alignment  # noqa: E402
from invdiff.models.base import FrozenBase  # noqa: E402
from invdiff.config import DebiasConfig  # noqa: E402
from invdiff.debiasing import debias  # noqa: E402
from invdiff.model_folders.load import load_model  # noqa: E402
from invdiff.sampling import GuidedDenoiser, sample  # noqa: E402

out, p, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
strengths = [float(s) for s in sys.argv[4:]] or [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
torch.set_num_threads(2)
os.makedirs(out, exist_ok=True)
setting = demo.Setting(f"colors2_p{p:g}", "", False, f"base_p{p:g}", "color", p, 2, "base_balanced")
data = demo._Data(setting, 16, 0, out)
cfg = DebiasConfig(seed=seed, calibrate=False)  # the probe measures the uncalibrated G
base_dir = demo.shipped_base(name=setting.base)
run = os.path.join(out, f"run_p{p:g}_s{seed}")
t0 = time.time()
result = debias(base_dir, data.train, run, cfg, data.spec, progress=False, overwrite=True)
print("debias", round(time.time() - t0), "s", flush=True)
align = group_alignment(result["weights"], result["scores"], data.minority, data.true_groups)
losses, prompt_ids = result["losses"].double(), data.train.prompt_ids
# training statistics per (prompt, t), the spread weights and each prompt's cut threshold
mean = torch.stack([losses[prompt_ids == q].mean(0) for q in range(10)])
std = torch.stack([losses[prompt_ids == q].std(0, unbiased=False) for q in range(10)])
weights = spread_weights(losses, prompt_ids)
k = cfg.groups
high = result["weights"].view(len(prompt_ids), -1, k)[:, :, -1].sum(1) > 0.5
threshold = torch.tensor([float(result["scores"][(prompt_ids == q) & high].min()) for q in range(10)])
train_share = torch.tensor([float(high[prompt_ids == q].double().mean()) for q in range(10)])

base = FrozenBase.from_pretrained(base_dir).freeze()
_, guidance = load_model(run)
band = guidance.config.get("band_start", 0) if hasattr(guidance, "config") else 0
per = 40
ids = torch.arange(10).repeat_interleave(per)
rows, dumps = {}, {}
for s in strengths:
    seeds = [seed * 1_000_000 + i for i in range(ids.numel())]
    images = sample(GuidedDenoiser(base, guidance, s), ids, seeds, 25, 1.0, progress=False, band_start=result["meta"]["band_start"])
    colour = data.measure(images, ids)
    minority_true = colour != data.majority[ids]
    gen = DiffusionDataset(images.clamp(-1, 1), ids, list(data.train.prompts), torch.arange(ids.numel()) + 10**9, "generated")
    gl, _ = collect_losses(base, gen, cfg.loss_timesteps, cfg.loss_draws, seed + 7, progress=False)
    z = (gl.double() - mean[ids]) / std[ids].clamp_min(1e-12)
    score = (z * weights).sum(1)
    proxy = score >= threshold[ids]
    # AUROC of the score for the true minority among generated
    from sklearn.metrics import roc_auc_score
    auroc = roc_auc_score(minority_true.numpy(), score.numpy()) if 0 < int(minority_true.sum()) < len(ids) else None
    true_share = [float(minority_true[ids == q].double().mean()) for q in range(10)]
    proxy_share = [float(proxy[ids == q].double().mean()) for q in range(10)]
    dumps[str(s)] = {"score": score.float(), "minority": minority_true, "ids": ids}
    rows[str(s)] = {"true_minority_share": true_share, "proxy_share": proxy_share, "auroc": auroc,
                    "mean_true": sum(true_share) / 10, "mean_proxy": sum(proxy_share) / 10,
                    "mean_score": float(score.mean())}
    print(f"s={s} true {sum(true_share)/10:.3f} proxy {sum(proxy_share)/10:.3f} auroc {auroc}", flush=True)
    with open(os.path.join(out, f"probe_p{p:g}_s{seed}.json"), "w") as f:
        json.dump({"p": p, "seed": seed, "train_high_share": train_share.tolist(),
                   "balanced_minority_share": align["balanced_minority_share"], "rows": rows}, f, indent=1)
    torch.save({"train_scores": result["scores"], "train_minority": data.minority, "prompt_ids": prompt_ids,
                "train_losses": result["losses"], "dumps": dumps}, os.path.join(out, f"probe_p{p:g}_s{seed}.pt"))
