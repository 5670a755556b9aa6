"""Development script behind docs/dev_runs/README.md (design setting only); kept as it was run.
It writes its run folders under /tmp/exp and uses the demo's private helpers."""
import sys, torch, time
sys.path.insert(0, "/work/main")
from invdiff.data.colored_digits import colored_digits
from invdiff.models.base import FrozenBase
from invdiff.environments import collect_losses
p = float(sys.argv[1]); nc = int(sys.argv[2]); seed = int(sys.argv[3]); base_dir = sys.argv[4]; out = sys.argv[5]
torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 2)
base = FrozenBase.from_pretrained(base_dir).freeze()
train = colored_digits("train", p=p, num_colors=nc, resolution=16)
t0 = time.time()
losses, grid, bank = collect_losses(base, train.training_view(), 20, 1, seed, progress=False, return_bank=True)
print("seconds", time.time() - t0)
minority = train.attributes["color"] != train.attributes["digit"] % nc
torch.save({"losses": losses, "grid": grid, "prompt_ids": train.prompt_ids, "minority": minority, "color": train.attributes["color"], "digit": train.attributes["digit"]}, out)
