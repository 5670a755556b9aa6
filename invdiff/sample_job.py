"""A sharded, resumable sampling job: `invdiff sample --prompts FILE --out DIR [--resume]`.

FILE is .txt (one prompt per line; blank lines and lines starting with # are skipped) or .jsonl
({"prompt": ..., "num": 4, "seed": 100, "guidance_scale": 3.0}; all but prompt optional).
Every image is one item with a fixed id, seed and path, so the job can be cut anywhere:

- items are dealt to ranks by id (torchrun / accelerate launch; one process is rank 0 of 1), and
  each rank runs them through the continuous-batching engine, so an image depends only on its
  item, not on the number of ranks;
- an image is written atomically (temporary file, then rename), then its manifest record is
  appended to the rank's log DIR/.manifest/rank-R.jsonl and flushed to disk;
- `--resume` keeps an item only if its record is in a log and its PNG reads back whole; anything
  else (no record, a torn last line, a missing or corrupt file) is sampled again, to the same path;
- at the end the main process writes DIR/manifest.jsonl atomically: one record per image, in
  item order (prompt, seed, path, model, settings).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .data.base import DataError
from .io import atomic_write_text

JOB_FILE = "job.json"
MANIFEST = "manifest.jsonl"
LOG_DIR = ".manifest"


@dataclass(frozen=True)
class Item:
    item_id: int
    prompt: str
    seed: int
    guidance_scale: float
    path: str  # relative to the output folder


def read_prompts(path: str, num: int, seed: int, guidance_scale: float) -> List[Item]:
    """Items from a prompts file; a line's own num/seed/guidance_scale override the defaults.
    Seeds without a line seed continue one counter from `seed`, so they never repeat."""
    from .cli import prompt_dirname

    if not os.path.isfile(path):
        raise DataError(f"prompts file {path!r} does not exist")
    jsonl = path.endswith(".jsonl")
    items: List[Item] = []
    counters: Dict[str, int] = {}
    next_seed = seed
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or (not jsonl and text.startswith("#")):
                continue
            if jsonl:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise DataError(f"{path}:{lineno}: every line needs a string 'prompt'")
            else:
                row = {"prompt": text}
            n = row.get("num", num)
            if not isinstance(n, int) or n < 1:
                raise DataError(f"{path}:{lineno}: 'num' must be a positive integer, got {n!r}")
            scale = float(row.get("guidance_scale", guidance_scale))
            line_seed = row.get("seed")
            for j in range(n):
                if line_seed is None:
                    s, next_seed = next_seed, next_seed + 1
                else:
                    s = int(line_seed) + j
                k = counters.get(row["prompt"], 0)
                counters[row["prompt"]] = k + 1
                rel = os.path.join(prompt_dirname(row["prompt"]), f"{k:05d}-seed{s}.png")
                items.append(Item(len(items), row["prompt"], s, scale, rel))
    if not items:
        raise DataError(f"prompts file {path!r} lists no prompts")
    return items


def _png_is_whole(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, ValueError):
        return False


def _read_logs(out: str) -> Dict[int, Dict]:
    """Records from every rank's log (a torn last line is ignored)."""
    records: Dict[int, Dict] = {}
    log_dir = os.path.join(out, LOG_DIR)
    if not os.path.isdir(log_dir):
        return records
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short: its item is sampled again
                records[int(record["item"])] = record
    return records


def completed(out: str, items: List[Item]) -> Dict[int, Dict]:
    """Items whose record is logged and whose PNG reads back whole."""
    records = _read_logs(out)
    by_id = {it.item_id: it for it in items}
    return {
        i: r for i, r in records.items()
        if i in by_id and r.get("path") == by_id[i].path and _png_is_whole(os.path.join(out, r["path"]))
    }


def run_sample_job(model: str, prompts_file: str, out: str, *, num: int = 1, seed: int = 0, steps: int = 25,
                   guidance_scale: float = 1.0, scheduler: str = "ddim", strength: float = 1.0, batch_size: int = 64,
                   attention: str = "sdpa", resume: bool = False, overwrite: bool = False, progress: bool = True,
                   eta_below: Optional[float] = None) -> Dict:
    """Run (or resume) the job on this rank's share of the items. Returns a summary."""
    from .distributed import barrier, init_from_env
    from .engine import Request, SamplingEngine
    from .io import atomic_write_json
    from .models.sd import set_attention
    from .report import save_png, to_uint8
    from .runs import load_model
    from .sampling import GuidedDenoiser, below_band_eta

    rank, world = init_from_env()
    items = read_prompts(prompts_file, num, seed, guidance_scale)
    settings = {"model": os.path.abspath(model), "steps": steps, "scheduler": scheduler, "strength": strength,
                "attention": attention, "prompts_file": os.path.abspath(prompts_file), "num": num, "seed": seed,
                "guidance_scale": guidance_scale, "eta_below": eta_below}
    job_path = os.path.join(out, JOB_FILE)
    if os.path.isfile(job_path):
        with open(job_path) as f:
            previous = json.load(f).get("settings")
        if previous != settings and not overwrite:
            raise FileExistsError(f"{out!r} holds a sampling job with other settings; choose another --out or pass --overwrite")
        if not resume and not overwrite:
            raise FileExistsError(f"{out!r} already holds this job; pass --resume to finish it")
    elif os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out!r} is not empty and holds no sampling job; choose another --out")
    barrier()  # every rank has checked the folder before the main process writes to it
    if rank == 0:
        os.makedirs(os.path.join(out, LOG_DIR), exist_ok=True)
        if overwrite and not resume:
            for name in os.listdir(os.path.join(out, LOG_DIR)):
                os.remove(os.path.join(out, LOG_DIR, name))
        atomic_write_json(job_path, {"settings": settings, "items": len(items)})
    barrier()
    done = completed(out, items) if resume else {}
    mine = [it for it in items if it.item_id % world == rank and it.item_id not in done]

    base, guidance = load_model(model)
    active_attention = set_attention(base.unet, attention)
    prompt_ids = base.conditioner.prompt_ids(sorted({it.prompt for it in mine})) if mine else None
    id_of = dict(zip(sorted({it.prompt for it in mine}), prompt_ids.tolist())) if mine else {}
    denoiser = GuidedDenoiser(base, guidance, strength)
    eta_below, t_switch = below_band_eta(denoiser, scheduler, eta_below, None)
    engine = SamplingEngine(denoiser, scheduler, max_batch=batch_size, eta_below=eta_below, t_switch=t_switch)
    for it in mine:
        engine.submit(Request(id_of[it.prompt], it.seed, steps, it.guidance_scale, request_id=it.item_id))
    by_id = {it.item_id: it for it in items}
    log_path = os.path.join(out, LOG_DIR, f"rank-{rank:05d}.jsonl")
    from tqdm.auto import tqdm

    with open(log_path, "a") as log, tqdm(total=len(mine), desc=f"sample job (rank {rank})", disable=not progress, unit="img") as bar:
        while engine.pending or engine.active:
            finished = engine.step()
            for item_id, image in finished.items():
                it = by_id[item_id]
                save_png(to_uint8(image[None])[0], os.path.join(out, it.path))
                record = {"item": it.item_id, "prompt": it.prompt, "seed": it.seed, "guidance_scale": it.guidance_scale,
                          "path": it.path, "model": settings["model"], "rank": rank}
                log.write(json.dumps(record) + "\n")
                log.flush()
                os.fsync(log.fileno())  # the record is on disk before the next image is started
                bar.update(1)
    barrier()
    summary = {"items": len(items), "sampled_here": len(mine), "resumed": len(done), "rank": rank, "world": world,
               "attention": active_attention}
    if rank == 0:
        final = completed(out, items)
        missing = [it.item_id for it in items if it.item_id not in final]
        if missing:
            raise RuntimeError(f"{len(missing)} item(s) have no image after the job (e.g. {missing[:5]}); run again with --resume")
        lines = [json.dumps({k: v for k, v in {**final[it.item_id], "settings": settings}.items() if k != "rank"}, sort_keys=True)
                 for it in items]
        atomic_write_text(os.path.join(out, MANIFEST), "\n".join(lines) + "\n")
        summary["manifest"] = os.path.join(out, MANIFEST)
    barrier()
    return summary
