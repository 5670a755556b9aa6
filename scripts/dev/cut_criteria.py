"""Development script behind docs/dev_runs/README.md (design setting only); kept as it was run.
It writes its run folders under /tmp/exp and uses the demo's private helpers."""
import sys, torch, numpy as np
sys.path.insert(0, "/work/main"); torch.set_num_threads(1)
from invdiff.environments import aggregate_losses, infer_environments_gap, infer_environments_mixture
from invdiff.metrics import group_alignment
def ki(x, min_size=2):
    xs, order = x.double().sort(); n = len(x); best, bj = None, None
    for j in range(max(min_size, n // 2) - 1, n - min_size):  # low = xs[:j+1]
        a, b = xs[: j + 1], xs[j + 1 :]
        p1, p2 = len(a) / n, len(b) / n
        s1, s2 = a.std(unbiased=False).clamp_min(1e-6), b.std(unbiased=False).clamp_min(1e-6)
        J = p1 * torch.log(s1) + p2 * torch.log(s2) - p1 * np.log(p1) - p2 * np.log(p2)
        if best is None or J < best: best, bj = J, j
    g = torch.zeros(n, dtype=torch.long); g[order[bj + 1:]] = 1
    return torch.nn.functional.one_hot(g, 2).float()
for f in sys.argv[1:]:
    d = torch.load(f); L, pid, mino = d["losses"], d["prompt_ids"], d["minority"]
    true = d["digit"] * 3 + d["color"]
    s = aggregate_losses(L, pid, "spread")
    def pp(fn):
        W = torch.zeros(len(pid), 20)
        for p in range(10):
            r = pid == p; W[r, 2*p:2*p+2] = fn(s[r])
        return group_alignment(W, s, mino, true)["balanced_minority_share"]
    print(f, "gap", round(pp(lambda x: infer_environments_gap(x, 2)), 3), "ki", round(pp(ki), 3))
# planted gaussian per prompt
gen = torch.Generator().manual_seed(0)
for trial in range(3):
    sc = torch.randn(100, generator=gen); hot = torch.randperm(100, generator=gen)[:10]; sc[hot] += 5
    m = torch.zeros(100, dtype=torch.bool); m[hot] = True
    print("planted", [round(group_alignment(fn(sc), sc, m, m.long())["balanced_minority_share"], 3) for fn in (lambda x: infer_environments_gap(x, 2), ki, lambda x: infer_environments_mixture(x, 2))])
def wgap(x, f):
    xs, order = x.double().sort(); n = len(x); lo, hi = n // 2, n - 2
    gaps = xs[lo + 1: hi + 2] - xs[lo: hi + 1]
    nhigh = torch.arange(n - 1 - lo, n - 1 - hi - 1, -1).double()  # samples above cut j
    j = lo + int((gaps * f(nhigh)).argmax())
    g = torch.zeros(n, dtype=torch.long); g[order[j + 1:]] = 1
    return torch.nn.functional.one_hot(g, 2).float()
for name, f in (("sqrt", torch.sqrt), ("log", torch.log1p), ("1", lambda n: torch.ones_like(n))):
    res = []
    for fpath in sys.argv[1:]:
        d = torch.load(fpath); L, pid, mino = d["losses"], d["prompt_ids"], d["minority"]; true = d["digit"] * 3 + d["color"]
        s = aggregate_losses(L, pid, "spread"); W = torch.zeros(len(pid), 20)
        for p in range(10):
            r = pid == p; W[r, 2*p:2*p+2] = wgap(s[r], f)
        res.append(round(group_alignment(W, s, mino, true)["balanced_minority_share"], 3))
    gen = torch.Generator().manual_seed(0); pl = []
    for trial in range(10):
        sc = torch.randn(100, generator=gen); hot = torch.randperm(100, generator=gen)[:10]; sc[hot] += 5
        m = torch.zeros(100, dtype=torch.bool); m[hot] = True
        pl.append(round(group_alignment(wgap(sc, f), sc, m, m.long())["balanced_minority_share"], 2))
    print(name, res, pl)
