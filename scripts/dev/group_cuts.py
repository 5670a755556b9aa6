"""Development script behind docs/dev_runs/README.md (design setting only); kept as it was run.
It writes its run folders under /tmp/exp and uses the demo's private helpers."""
import sys, torch, numpy as np
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from invdiff.environments import aggregate_losses, infer_environments_mixture, spread_weights
from invdiff.metrics import group_alignment
from sklearn.mixture import GaussianMixture
from sklearn.metrics import roc_auc_score
def robust_score(L, pid, weighted=True):
    L = L.double(); z = torch.empty_like(L)
    for g in pid.unique():
        r = pid == g; b = L[r]
        med = b.median(0).values
        mad = (b - med).abs().median(0).values * 1.4826
        z[r] = (b - med) / mad.clamp_min(1e-12)
    w = spread_weights(L, pid)
    return (z * w).sum(1).float()
def hard(W):
    h = torch.zeros_like(W); h[torch.arange(len(W)), W.argmax(1)] = 1; return h
def gap_cut(x):
    xs, idx = x.sort(); n = len(x); lo, hi = int(0.5 * n), n - 2
    gaps = xs[lo+1:hi+1] - xs[lo:hi]; j = lo + int(gaps.argmax()); thr = (xs[j] + xs[j+1]) / 2
    W = torch.zeros(n, 2); W[x > thr, 1] = 1; W[x <= thr, 0] = 1; return W
def log_gmm(x):
    return infer_environments_mixture(torch.log(x - x.min() + 1e-3 * (x.max()-x.min())), 2)
for f in sys.argv[1:]:
    d = torch.load(f)
    L, pid, mino = d["losses"], d["prompt_ids"], d["minority"]
    true = d["digit"] * 3 + d["color"]
    def share(W): return group_alignment(W, torch.zeros(len(pid)), mino, true)["balanced_minority_share"]
    def pp(fn, s):
        W = torch.zeros(len(pid), 20)
        for p in range(10):
            r = pid == p; W[r, 2*p:2*p+2] = fn(s[r])
        return W
    out = {}
    for sname, s in (("spread", aggregate_losses(L, pid, "spread")), ("robust", robust_score(L, pid))):
        out[sname+" auroc"] = roc_auc_score(mino, s)
        out[sname+" gmm"] = share(pp(lambda x: infer_environments_mixture(x, 2), s))
        out[sname+" gmmhard"] = share(hard(pp(lambda x: infer_environments_mixture(x, 2), s)))
        out[sname+" gap"] = share(pp(gap_cut, s))
        out[sname+" loggmm"] = share(pp(log_gmm, s))
    print(f, {k: round(v, 3) for k, v in out.items()})
