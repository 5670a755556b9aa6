"""Development run (issue 21): the frozen losses of the shipped colored-digit bases at several p.

    OMP_NUM_THREADS=1 python scripts/dev/collect_p_losses.py OUT_DIR 0.6 0.7 0.8 0.9 0.95

The max step's losses (20 grid timesteps, 1 draw, seed 0: what `debias` computes at its
defaults) with the evaluation-only minority labels, as OUT_DIR/l_P.pt, for separation_signals.py.
"""
import sys, torch
sys.path.insert(0, __file__.rsplit('/scripts/', 1)[0])
torch.set_num_threads(1)
import invdiff.demo as demo
from invdiff.environments import collect_losses, aggregate_losses
from invdiff.models.base import FrozenBase
out = sys.argv[1]
for p in [float(x) for x in sys.argv[2:]]:
    st = demo.Setting(f"c{p}", "", False, f"base_p{p:g}", "color", p, 2, "base_balanced")
    data = demo._Data(st, 16, 0, out)
    base = FrozenBase.from_pretrained(demo.shipped_base(name=st.base)).freeze()
    losses, _ = collect_losses(base, data.train.training_view(), 20, 1, 0, progress=False)
    torch.save({"losses": losses, "prompt_ids": data.train.prompt_ids, "minority": data.minority}, f"{out}/l_{p:g}.pt")
    print(p, flush=True)
