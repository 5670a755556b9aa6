"""Development script behind docs/dev_runs/README.md (design setting only); kept as it was run.
It writes its run folders under /tmp/exp and uses the demo's private helpers."""
import sys, os, json, time, torch, dataclasses
sys.path.insert(0, "/work/main")
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from invdiff.demo import shipped_base, _evaluate, _Data, SETTINGS
import tempfile
from invdiff.data.colored_digits import colored_digits
from invdiff.models.base import FrozenBase
from invdiff.environments import collect_losses
from invdiff.metrics import load_digit_classifier, group_alignment
from invdiff.config import DebiasConfig, recipe_config
from invdiff.debiasing import debias
from invdiff.model_folders.load import load_model
out = sys.argv[1]; seed = int(sys.argv[2]); variants = sys.argv[3].split(",")
steps = int(os.environ.get("STEPS", "1000")); per = int(os.environ.get("PER", "30"))
base_dir = shipped_base(0.9)
base = FrozenBase.from_pretrained(base_dir).freeze()
train = colored_digits("train", p=0.9, num_colors=2, resolution=16)
ref = colored_digits("eval", num_colors=2, resolution=16).images
clf = load_digit_classifier()
true_groups = train.attributes["digit"] * 2 + train.attributes["color"]
minority = train.attributes["color"] != train.attributes["digit"] % 2
settings = {"per_digit": per, "sample_steps": 25, "guidance_scale": 1.0}
cfg0 = DebiasConfig(seed=seed, steps=steps)
frozen = dict(zip(("losses", "timesteps", "bank"), collect_losses(base, train.training_view(), cfg0.loss_timesteps, cfg0.loss_draws, seed, progress=False, return_bank=True)))
results = {}
if os.path.exists(out): results = json.load(open(out))
SK = os.environ.get("SETTING", "colors2_p0.9")
data = _Data(SETTINGS[SK], 16, 0, tempfile.mkdtemp())
base_dir = shipped_base(name=SETTINGS[SK].base); base = FrozenBase.from_pretrained(base_dir).freeze(); train = data.train
true_groups, minority = data.true_groups, data.minority
frozen = dict(zip(("losses", "timesteps", "bank"), collect_losses(base, train.training_view(), cfg0.loss_timesteps, cfg0.loss_draws, seed, progress=False, return_bank=True)))
def ev(name, guidance, w=1.0, s=1.0):
    r, _ = _evaluate(base, guidance, s, {**settings, "guidance_scale": w}, seed, clf, data)
    results[name] = {k: r[k] for k in ("bias", "digit_accuracy", "frechet_distance")}
    print(name, results[name], flush=True); json.dump(results, open(out, "w"), indent=1)
for v in variants:
    parts = v.split(":")  # name:recipe:key=val;key=val
    name, recipe = parts[0], parts[1]
    kw = dict(x.split("=") for x in parts[2].split(";")) if len(parts) > 2 and parts[2] else {}
    oracle = kw.pop("oracle", None)
    ws = [float(x) for x in kw.pop("w", "1").split("/")]
    conv = {f.name: f.type for f in dataclasses.fields(DebiasConfig)}
    kw = {k: (float(x) if k in ("lam", "ema_decay", "jtt_upweight", "lr", "ratio", "importance_mix") else int(x) if k in ("steps", "groups", "lam_warmup") else (x == "1") if k in ("body", "head_sees_sample") else x) for k, x in kw.items()}
    if name == "base":
        for w in ws: ev(f"base_w{w:g}", None, w)
        continue
    cfg = recipe_config(recipe, seed=seed, steps=steps, **kw)
    weights = torch.nn.functional.one_hot(true_groups, 10 * SETTINGS[SK].num_values).float() if oracle else (torch.ones(len(train), 1) if recipe == "erm" else None)
    t0 = time.time()
    res = debias(base_dir, train, f"/tmp/exp/runs/{SK}_{name}_s{seed}", cfg, weights=weights, progress=False, frozen=frozen, overwrite=True)
    print(name, "train s", round(time.time() - t0), "t_min", res["meta"]["t_min"], flush=True)
    if weights is None:
        a = group_alignment(res["weights"], res["scores"], minority, true_groups) if res["weights"].shape[1] > 1 else {}
        print("  share", a.get("balanced_minority_share"), flush=True)
    _, g = load_model(f"/tmp/exp/runs/{SK}_{name}_s{seed}")
    for w in ws: ev(f"{name}_w{w:g}", g, w)
