"""Development run (issue 21): which label-free signal says whether the readout can be trusted.

    python scripts/dev/separation_signals.py OUT_DIR 0.95 0.9 0.8 0.7 0.6

For each p (losses from collect_p_losses.py), per prompt: Otsu's effectiveness eta and the
groups' d' on the raw and winsorized scores, "z_high" (the Otsu high group's median above the
low group's, in the low group's 1.4826 x MAD: what calibration.SEPARATION_TRUST gates on), the
BIC gain of two Gaussians over one, the high group's share, and (evaluation only) the score's
AUROC for the minority. Prints the median [min, max] over prompts.
"""
import torch, sys, math
sys.path.insert(0, __file__.rsplit('/scripts/', 1)[0])
from invdiff.environments import infer_environments_otsu, winsorize_far_out, aggregate_losses
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
import numpy as np
folder = sys.argv[1]
for p in sys.argv[2:]:
    d=torch.load(f"{folder}/l_{p}.pt")
    sc=aggregate_losses(d["losses"], d["prompt_ids"], "spread").double(); pid=d["prompt_ids"]; mi=d["minority"]
    rows=[]
    for q in range(10):
        r=sc[pid==q]; m=mi[pid==q]
        hi=infer_environments_otsu(r,2)[:,1]>0.5
        out={}
        for name,v in (("raw",r),("win",winsorize_far_out(r))):
            f1=hi.double().mean(); tot=v.var(unbiased=False)
            m0,m1=v[~hi].mean(),v[hi].mean()
            out["eta_"+name]=float(f1*(1-f1)*(m1-m0)**2/tot)
            out["d_"+name]=float((m1-m0)/((v[~hi].var()+v[hi].var())/2).sqrt())
        # robust: gap between groups in units of the low group's MAD
        lo=r[~hi]; mad=(lo-lo.median()).abs().median()*1.4826
        out["z_high"]=float((r[hi].median()-lo.median())/mad)
        x=winsorize_far_out(r).numpy().reshape(-1,1)
        b1=GaussianMixture(1).fit(x).bic(x); b2=GaussianMixture(2,n_init=3,random_state=0).fit(x).bic(x)
        out["dbic_per_n"]=float((b1-b2)/len(x))
        out["share"]=float(hi.double().mean())
        out["auroc"]=roc_auc_score(m.numpy(), r.numpy())
        rows.append(out)
    keys=rows[0].keys()
    print(p, " ".join(f"{k} {np.median([r[k] for r in rows]):.2f}[{min(r[k] for r in rows):.2f},{max(r[k] for r in rows):.2f}]" for k in keys))
