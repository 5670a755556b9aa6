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

Bad input costs nothing: the prompts file, the job state, the rank logs, the model and every
prompt against it are checked before any file is written or any image sampled.
`load_samples` reads the images back from this folder or from a plain `invdiff sample` folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..config import DEFAULT_GUIDANCE_EVERY
from ..errors import CheckpointError, DataError
from ..io import atomic_write_text, path_inside, read_json
from ..limits import MAX_JOB_IMAGES, SEED_LIMIT

if TYPE_CHECKING:  # torch is imported where images are made or read: the prompts file is checked without it
    import torch

JOB_FILE = "job.json"
MANIFEST = "manifest.jsonl"
PLAIN_MANIFEST = "manifest.json"  # written by `invdiff sample --prompt`
LOG_DIR = ".manifest"
LOG_NAME = re.compile(r"rank-\d+\.jsonl")
PROMPT_FIELDS = ("prompt", "num", "seed", "guidance_scale")
# A prompt's folder: a readable slug of at most this many characters, then a hash of the prompt.
SLUG_CHARS = 48
PROMPT_HASH_CHARS = 10


@dataclass(frozen=True)
class Item:
    item_id: int
    prompt: str
    seed: int
    guidance_scale: float
    path: str  # relative to the output folder


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no count or seed


def _is_finite_number(value) -> bool:
    # json.loads reads NaN, Infinity and 1e999 (inf) as floats
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_defaults(num, seed, guidance_scale) -> None:
    if not _is_int(num) or not 1 <= num <= MAX_JOB_IMAGES:
        raise ValueError(f"num must be an integer in [1, {MAX_JOB_IMAGES}], got {num!r}")
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if not _is_finite_number(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")


def _line_settings(row, where: str, num: int, guidance_scale: float) -> Tuple[int, Optional[int], float]:
    """(num, seed or None, guidance_scale) of one prompts-file row; `where` is "FILE:LINE"."""
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise DataError(f"{where}: every line needs a non-empty string 'prompt'")
    unknown = sorted(set(row) - set(PROMPT_FIELDS))
    if unknown:  # a misspelt field would silently sample with the default instead
        raise DataError(f"{where}: unknown field(s) {unknown}; a line may set {', '.join(PROMPT_FIELDS)}")
    n = row.get("num", num)
    if not _is_int(n) or not 1 <= n <= MAX_JOB_IMAGES:
        raise DataError(f"{where}: 'num' must be an integer in [1, {MAX_JOB_IMAGES}] (invdiff/limits.py), got {n!r}")
    scale = row.get("guidance_scale", guidance_scale)
    if not _is_finite_number(scale):
        raise DataError(f"{where}: 'guidance_scale' must be a finite number, got {scale!r}")
    line_seed = row.get("seed")
    if "seed" in row:
        if not _is_int(line_seed) or line_seed < 0:
            raise DataError(f"{where}: 'seed' must be an integer >= 0, got {line_seed!r}")
        if line_seed + n > SEED_LIMIT:
            raise DataError(f"{where}: seeds {line_seed}..{line_seed + n - 1} pass torch's limit 2**64 - 1")
    return n, line_seed, float(scale)


def prompt_dirname(prompt: str) -> str:
    """The folder of a prompt's images: a readable slug of at most SLUG_CHARS characters, then a
    hash of the prompt's exact text ("digit 3" -> "digit_3-5f1c0a9e2b"). The hash makes the map
    one-to-one: "a b", "a/b" and "a_b" share a slug but not a folder, and a prompt with no ASCII
    letters gets one of its own. The length is capped, so no prompt makes a name the file system
    refuses."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", prompt).strip("._-")[:SLUG_CHARS].rstrip("._-") or "prompt"
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:PROMPT_HASH_CHARS]
    return f"{slug}-{digest}"


def read_prompts(path: str, num: int, seed: int, guidance_scale: float) -> List[Item]:
    """Items from a prompts file; a line's own num/seed/guidance_scale override the defaults.
    Seeds without a line seed continue one counter from `seed`, so they never repeat.
    A bad line is a DataError naming the file and line, bad defaults a ValueError."""

    _check_defaults(num, seed, guidance_scale)
    if not os.path.isfile(path):
        raise DataError(f"prompts file {path!r} does not exist")
    jsonl = path.endswith(".jsonl")
    items: List[Item] = []
    counters: Dict[str, int] = {}
    next_seed = seed
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the prompts file as UTF-8") from None
            if not text or (not jsonl and text.startswith("#")):
                continue
            where = f"{path}:{lineno}"
            if jsonl:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
            else:
                row = {"prompt": text}
            n, line_seed, scale = _line_settings(row, where, num, guidance_scale)
            if len(items) + n > MAX_JOB_IMAGES:  # every item is held in memory before sampling starts
                raise DataError(f"{where}: the job would make more than {MAX_JOB_IMAGES} images (invdiff/limits.py); "
                                "split the prompts file into several jobs")
            if line_seed is None and next_seed + n > SEED_LIMIT:
                raise DataError(f"{where}: the seeds counted on from {seed} pass torch's limit 2**64 - 1; "
                                "give the line its own 'seed' or start from a smaller one")
            for j in range(n):
                if line_seed is None:
                    s, next_seed = next_seed, next_seed + 1
                else:
                    s = line_seed + j
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


_DAMAGED_LOG_HINT = "the job's log is damaged: delete the line (its image is sampled again) or start afresh with --overwrite"


def _log_record(raw: bytes, where: str) -> Dict:
    try:
        record = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise DataError(f"{where}: not valid JSON ({exc}); {_DAMAGED_LOG_HINT}") from exc
    if not isinstance(record, dict) or not _is_int(record.get("item")):
        raise DataError(f"{where}: a record needs an integer 'item'; {_DAMAGED_LOG_HINT}")
    if not isinstance(record.get("path"), str):
        raise DataError(f"{where}: a record needs a string 'path'; {_DAMAGED_LOG_HINT}")
    return record


def _read_logs(out: str) -> Dict[int, Dict]:
    """Records from every rank's log, by item.

    Each record is written whole with its newline and fsynced before the next image starts, and a
    rank cuts a torn tail off its log before appending (`_cut_torn_tail`). So a kill can only
    leave the *last* line of a log without its newline: that line is dropped and its item sampled
    again. Any other line that is not a record is a DataError naming the file and line."""
    records: Dict[int, Dict] = {}
    log_dir = os.path.join(out, LOG_DIR)
    if not os.path.isdir(log_dir):
        return records
    for name in sorted(os.listdir(log_dir)):
        if not LOG_NAME.fullmatch(name):
            continue
        path = os.path.join(log_dir, name)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # the torn last line
                if raw.strip():
                    record = _log_record(raw, f"{path}:{lineno}")
                    records[record["item"]] = record
    return records


def _cut_torn_tail(log_path: str) -> None:
    """Truncate a log after its last newline. A record appended to a torn line would be glued to
    it and lost with it (the job then ends with an item that has no record)."""
    if not os.path.isfile(log_path):
        return
    with open(log_path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        keep, pos = 0, end
        while pos > 0:
            start = max(0, pos - 4096)
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            pos = start
        if keep != end:
            f.truncate(keep)


def _read_job_settings(job_path: str) -> Dict:
    """The settings of an earlier job; CheckpointError naming the file when it is damaged."""
    job = read_json(job_path, "sampling job file")
    if not isinstance(job, dict) or not isinstance(job.get("settings"), dict):
        raise CheckpointError(f"sampling job file {job_path} is damaged: expected a JSON object with 'settings'; "
                              "pass --overwrite to start the job afresh")
    return job["settings"]


def _job_settings_or_none(job_path: str) -> Optional[Dict]:
    """The settings of an earlier job, or None when there is none or its file is damaged."""
    if not os.path.isfile(job_path):
        return None
    try:
        return _read_job_settings(job_path)
    except CheckpointError:
        return None


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
                   eta_below: Optional[float] = None, height: Optional[int] = None, width: Optional[int] = None,
                   base_dir: Optional[str] = None, guidance_every: int = DEFAULT_GUIDANCE_EVERY) -> Dict:
    """Run (or resume) the job on this rank's share of the items. Returns a summary. height, width:
    the images' size in pixels (None: the size the run trained at, else the model's native size;
    model_folders.sampling_size). base_dir: a run's base model at a new place (model_folders.load.load_model).
    guidance_every: G's body at every k-th step, reused between (sampling.GuidedSchedule)."""
    from ..distributed import barrier, init_from_env
    from ..io import atomic_write_json
    from ..models.sd import set_attention
    from ..report import save_png, to_uint8
    from ..model_folders import sampling_size
    from ..model_folders.load import load_model
    from .engine import Request
    from .sampler import GuidedDenoiser, sampling_engine

    rank, world = init_from_env()
    items = read_prompts(prompts_file, num, seed, guidance_scale)
    height, width = sampling_size(model, height, width)
    settings = {"model": os.path.abspath(model), "steps": steps, "scheduler": scheduler, "strength": strength,
                "attention": attention, "prompts_file": os.path.abspath(prompts_file), "num": num, "seed": seed,
                "guidance_scale": guidance_scale, "eta_below": eta_below, "height": height, "width": width}
    if base_dir is not None:  # only when given: jobs made before it existed keep their settings
        settings["base"] = os.path.abspath(base_dir)
    if guidance_every != 1:  # likewise: only when G is reused (1 is what jobs before it sampled with)
        settings["guidance_every"] = guidance_every
    job_path = os.path.join(out, JOB_FILE)
    from ..outputs import check_output_folder, read_marker, write_marker

    # Not invdiff's, not a job, or holding anything the job did not write: refused, --overwrite included.
    check_output_folder(out, "sample-job", overwrite)
    if os.path.isfile(job_path):
        if not overwrite:  # --overwrite replaces the job whatever its file holds
            if _read_job_settings(job_path) != settings:
                raise FileExistsError(f"{out!r} holds a sampling job with other settings; "
                                      "choose another --out or pass --overwrite")
            if not resume:
                raise FileExistsError(f"{out!r} already holds this job; pass --resume to finish it")
    elif os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out!r} is not empty and holds no sampling job; choose another --out")
    # --resume keeps finished images only of this very job: with --overwrite and other settings
    # (or a damaged job file) the old images were made differently and are sampled again.
    resumable = resume and (not overwrite or _job_settings_or_none(job_path) == settings)
    done = completed(out, items) if resumable else {}
    mine = [it for it in items if it.item_id % world == rank and it.item_id not in done]

    # The model, every prompt of the job and the sampler settings are checked here, before the
    # job's files exist: bad input must leave no job behind that --resume would then trip over.
    base, guidance = load_model(model, base_dir)
    active_attention = set_attention(base.unet, attention)
    prompts = sorted({it.prompt for it in items})
    id_of = dict(zip(prompts, base.conditioner.prompt_ids(prompts).tolist()))
    denoiser = GuidedDenoiser(base, guidance, strength)
    engine = sampling_engine(denoiser, scheduler, batch_size, eta_below=eta_below, height=height, width=width,
                             guidance_every=guidance_every)
    for it in mine:
        engine.submit(Request(id_of[it.prompt], it.seed, steps, it.guidance_scale, request_id=it.item_id))

    barrier()  # every rank has checked its input before the main process writes to the folder
    if rank == 0:
        old_marker = read_marker(out) if os.path.isdir(out) else None
        if overwrite and not resumable and old_marker is not None:
            # The old job is replaced whole: everything its marker lists (and nothing else is
            # there: check_output_folder) goes, so no image of other settings stays behind.
            for name in old_marker["entries"]:
                _remove_entry(os.path.join(out, name))
        os.makedirs(os.path.join(out, LOG_DIR), exist_ok=True)
        # The marker lists the folders the job will fill before any is made, so a job cut short
        # is still recognised as invdiff's own (by --resume, and by --overwrite).
        listed = set(old_marker["entries"]) if old_marker and resumable else set()
        write_marker(out, "sample-job", listed | {JOB_FILE, MANIFEST, LOG_DIR} | {os.path.dirname(it.path) for it in items})
        atomic_write_json(job_path, {"settings": settings, "items": len(items)})
    barrier()
    by_id = {it.item_id: it for it in items}
    log_path = os.path.join(out, LOG_DIR, f"rank-{rank:05d}.jsonl")
    _cut_torn_tail(log_path)
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


def _remove_entry(path: str) -> None:
    import shutil

    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


# ----------------------------------------------------------------------------- reading samples back


def _manifest_entries(directory: str) -> Tuple[str, List[Tuple[str, Dict]]]:
    """(manifest path, [(where, entry)]) from the folder's one manifest; `where` names the
    manifest and the entry (its line in manifest.jsonl, its index in manifest.json)."""
    if not os.path.isdir(directory):
        raise DataError(f"sample folder not found: {directory}")
    plain, job = os.path.join(directory, PLAIN_MANIFEST), os.path.join(directory, MANIFEST)
    if os.path.isfile(plain) and os.path.isfile(job):
        raise DataError(f"{directory} holds both {PLAIN_MANIFEST} and {MANIFEST}; keep the one that lists its samples")
    if os.path.isfile(plain):
        manifest = read_json(plain, "sample manifest")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("images"), list):
            raise DataError(f"{plain}: expected an object with an 'images' list")
        return plain, [(f"{plain}: images[{i}]", e) for i, e in enumerate(manifest["images"])]
    if os.path.isfile(job):
        entries = []
        with open(job, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    entries.append((f"{job}:{lineno}", json.loads(raw)))
                except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
                    raise DataError(f"{job}:{lineno}: not valid JSON ({exc})") from exc
        return job, entries
    unfinished = "; the sampling job there is unfinished: run it again with --resume" if os.path.isfile(
        os.path.join(directory, JOB_FILE)) else ""
    raise DataError(f"sample manifest not found in {directory}: expected {PLAIN_MANIFEST} (invdiff sample --prompt) "
                    f"or {MANIFEST} (invdiff sample --prompts){unfinished}")


def _image_inside(directory: str, rel: str, where: str) -> str:
    """The real path of a manifest's image. A manifest is untrusted input, so a path that leads
    outside the folder (absolute, through '..' or a link out of it) is refused rather than read."""
    full = path_inside(directory, rel)
    if full is None:
        raise DataError(f"{where}: image path {rel!r} leads outside {directory}")
    if not os.path.isfile(full):
        raise DataError(f"{where}: image {rel!r} is missing")
    return full


def load_samples(directory: str) -> Tuple["torch.Tensor", List[str]]:
    """Images and prompts from a folder written by `invdiff sample`, in manifest order: its
    manifest.json (`--prompt`) or manifest.jsonl (a `--prompts` job).

    Returns (images (N, 3, H, W) float32 in [-1, 1], prompts: N strings, prompts[i] made images[i]).
    A missing folder or manifest, a malformed entry, an image path outside the folder, a missing
    or unreadable image and mixed image sizes are DataErrors naming the manifest and the entry; a
    manifest.json that is not JSON is a CheckpointError naming it.
    """
    import numpy as np
    import torch
    from PIL import Image

    manifest, entries = _manifest_entries(directory)
    if not entries:
        raise DataError(f"{manifest} lists no images")
    pixels, prompts, first = [], [], None
    for where, entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise DataError(f"{where}: every entry needs a string 'prompt'")
        if not isinstance(entry.get("path"), str):
            raise DataError(f"{where}: every entry needs a string 'path'")
        full = _image_inside(directory, entry["path"], where)
        try:
            with Image.open(full) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, Image.DecompressionBombError) as exc:  # truncated or not an image at all
            raise DataError(f"{where}: {entry['path']!r} is not a readable image: {exc}") from exc
        if first is None:
            first = (rgb.shape, entry["path"])
        elif rgb.shape != first[0]:
            raise DataError(f"{where}: image sizes differ: {entry['path']!r} is {rgb.shape[0]}x{rgb.shape[1]}, "
                            f"{first[1]!r} is {first[0][0]}x{first[0][1]}")
        pixels.append(rgb)
        prompts.append(entry["prompt"])
    # uint8 while reading (a quarter of float32's memory), float32 once at the end
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, prompts
