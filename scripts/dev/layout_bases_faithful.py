"""Does each new base reproduce its data's bias (the base must be faithful first)? Sample 40 per
digit with the demo's sampler settings and read the attribute with the probe (issue 21).

    OMP_NUM_THREADS=2 python scripts/dev/layout_bases_faithful.py   # writes docs/dev_runs/layout_bases_faithful.json
"""
import sys, json, torch
ROOT = __file__.rsplit("/scripts/", 1)[0]
sys.path.insert(0, ROOT)
torch.set_num_threads(2)
from invdiff.demo import shipped_base
from invdiff.models.base import FrozenBase
from invdiff.sampling import GuidedDenoiser, sample
from invdiff.data.layout_digits import LayoutProbe, layout_digits
out = {}
for attribute in ("position", "size"):
    for name in (f"base_{attribute}_p0.9", f"base_{attribute}_balanced"):
        base = FrozenBase.from_pretrained(shipped_base(name=name)).freeze()
        ids = torch.arange(10).repeat_interleave(40)
        images = sample(GuidedDenoiser(base, None, 1.0), ids, list(range(400)), 25, 1.0, progress=False)
        value = LayoutProbe(layout_digits("eval", attribute), attribute)(images, ids)
        share = float((value == ids % 2).float().mean())
        out[name] = share
        print(name, "majority-value share of samples", round(share, 3), flush=True)
json.dump(out, open(ROOT + "/docs/dev_runs/layout_bases_faithful.json", "w"), indent=1)
