"""Development run (issue 21): label-free readouts of generated samples against the truth.

    python scripts/dev/calibration_readouts.py OUT_DIR/probe_pP_sSEED.pt

Reads a dump of scripts/dev/calibration_probe.py and prints, per strength, the true minority
share (colour probe) beside the share of samples at or above each prompt's Otsu cut ("otsu", the
readout invdiff/calibration.py uses), at or above the gap cut ("gap"), and a kernel-density
mixture estimate ("mixpi"), with the per-prompt shares of the truth and of the Otsu readout.
"""
import torch, sys
sys.path.insert(0, __file__.rsplit('/scripts/', 1)[0])
from invdiff.environments import infer_environments_otsu, infer_environments_gap, infer_environments_mixture
d = torch.load(sys.argv[1], weights_only=False)
ts, tm, pid = d["train_scores"].double(), d["train_minority"], d["prompt_ids"]
thr = {}
for name, f in (("otsu", infer_environments_otsu), ("gap", infer_environments_gap)):
    th = []
    for q in range(10):
        r = ts[pid == q]
        g = f(r, 2)[:, 1] > 0.5
        th.append(float(r[g].min()))
    thr[name] = torch.tensor(th)
# training true / otsu share
print("train true minority", float(tm.double().mean()), "otsu share", float(sum((ts[pid==q] >= thr['otsu'][q]).double().mean() for q in range(10))/10))
for s, dd in d["dumps"].items():
    sc, mi, ids = dd["score"].double(), dd["minority"], dd["ids"]
    line = f"s={s} true {float(mi.double().mean()):.3f}"
    for name, th in thr.items():
        line += f" {name} {float((sc >= th[ids]).double().mean()):.3f}"
    # mixture fit: generated score vs training per-prompt low/high (otsu) score samples: EM on weight pi
    pis = []
    for q in range(10):
        r = ts[pid == q]; hi = r >= thr['otsu'][q]
        x = sc[ids == q]
        # kernel density of each training group
        def kde(pts, x, bw):
            return torch.exp(-0.5 * ((x[:, None] - pts[None]) / bw) ** 2).mean(1) / bw
        bw = 1.06 * r.std() * len(r) ** -0.2
        f0, f1 = kde(r[~hi], x, bw) + 1e-12, kde(r[hi], x, bw) + 1e-12
        pi = 0.5
        for _ in range(200):
            w = pi * f1 / (pi * f1 + (1 - pi) * f0)
            pi = float(w.mean())
        pis.append(pi)
    line += f" mixpi {sum(pis)/10:.3f}"
    # per-prompt true vs otsu
    line += f" | per-prompt true {[round(float(mi[ids==q].double().mean()),2) for q in range(10)]}"
    line += f" otsu {[round(float((sc[ids==q] >= thr['otsu'][q]).double().mean()),2) for q in range(10)]}"
    print(line)
