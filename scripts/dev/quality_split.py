"""Development script behind docs/dev_runs/README.md (design setting only); kept as it was run.
It writes its run folders under /tmp/exp and uses the demo's private helpers."""
import sys, torch, tempfile
sys.path.insert(0, "/work/main"); torch.set_num_threads(1)
from invdiff.demo import SETTINGS, _Data
from invdiff.model_folders.load import load_model
from invdiff.sampling import GuidedDenoiser, sample
from invdiff.metrics import load_digit_classifier, predict_color, frechet_distance
data = _Data(SETTINGS["colors2_p0.9"], 16, 0, tempfile.mkdtemp())
clf = load_digit_classifier()
import os, invdiff.sampling.step_coeffs as sc, invdiff.sampling.engine as en
if os.environ.get("ETA_BELOW"):
    eb, tb = float(os.environ["ETA_BELOW"]), int(os.environ.get("T_BELOW", "800"))
    orig = sc.plan_steps
    def mixed(scheduler, steps, eta=0.0):
        hi, lo = orig(scheduler, steps, eta), orig(scheduler, steps, eb)
        low = hi.timesteps < tb
        hi.coeffs[low] = lo.coeffs[low]; hi.draws_noise[low] = lo.draws_noise[low]
        return hi
    sc.plan_steps = mixed; en.plan_steps = mixed
ids = torch.arange(10).repeat_interleave(30); seeds = list(range(300))
for r in sys.argv[1:]:
    base, g = load_model(r) if r != "base" else load_model("/work/main/invdiff/assets/base_p0.9")
    import os; x = sample(GuidedDenoiser(base, g), ids, seeds, int(os.environ.get("NSTEPS", "25")), 1.0, progress=False, eta=float(os.environ.get("ETA", "0")), scheduler=os.environ.get("SCHED", "ddim"))
    col = predict_color(x, 2); minor = col != ids % 2
    inten = ((x.clamp(-1,1)+1)/2).amax(1)
    peak = inten.flatten(1).quantile(0.95, dim=1)
    from invdiff.metrics import attribute_counts, bias_summary
    b = bias_summary(attribute_counts(ids, col, 10, 2))["bias"]
    print(r.split("/")[-1], "BIAS", round(b, 3), "n_minor", int(minor.sum()), "peak maj", round(float(peak[~minor].mean()),3), "peak min", round(float(peak[minor].mean()),3) if minor.any() else None,
          "fd all", round(frechet_distance(clf, data.eval.images, x)), "fd maj-only", round(frechet_distance(clf, data.eval.images, x[~minor])),
          "acc maj", round(float((clf(x[~minor]).argmax(1) == ids[~minor]).float().mean()),3), "acc min", round(float((clf(x[minor]).argmax(1) == ids[minor]).float().mean()),3) if minor.any() else None)
print("real eval peak", float(((data.eval.images+1)/2).amax(1).flatten(1).quantile(0.95, dim=1).mean()))
