"""`invdiff serve`'s engines: one engine per scheduler, every strength in its batch,
--max-batch as a cap over all engines together, and requests held while an engine restarts. Real uvicorn servers, as in test_service.py."""
import base64
import concurrent.futures
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from invdiff.cli import main
from invdiff.sampling.job import prompt_dirname
from invdiff.serve.settings import ServeSettings

from .test_service import decode, running_server, tiny_run, wait_for  # noqa: F401 (tiny_run is a fixture)

STRENGTHS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def _post(url, body):
    return httpx.post(f"{url}/v1/images", json=body, timeout=120)


def test_requests_at_many_strengths_share_one_engine_and_match_invdiff_sample(tiny_run, tmp_path):
    """8 concurrent requests at 8 strengths: one engine, one batch (a model call per step for all
    of them, not one per strength), and each image equals `invdiff sample --strength s`."""
    run, _ = tiny_run
    steps = 3
    with running_server(ServeSettings(model=run, max_batch=8, engine_process=False)) as (url, worker):
        engine = worker._engines["ddim"]
        calls_before = engine.model_evaluations
        bodies = [{"prompt": "digit 3", "seed": 40 + i, "steps": steps, "strength": s} for i, s in enumerate(STRENGTHS)]
        # The worker reads its inbox only once all 8 are in it, so that they join one batch.
        gate, drain = threading.Event(), worker._drain_inbox
        worker._drain_inbox = lambda block: drain(block) if gate.is_set() else time.sleep(0.01)
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(_post, url, b) for b in bodies]
            wait_for(lambda: worker._inbox.qsize() == len(bodies), timeout=30, what="8 requests in the inbox")
            gate.set()
            replies = [f.result() for f in futures]
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        assert list(worker._engines) == ["ddim"]  # no engine per strength
        assert engine.model_evaluations - calls_before == steps  # all 8 strengths in each call
    for body, reply in zip(bodies, replies):
        out = str(tmp_path / f"s{body['strength']}")
        assert main(["sample", "--model", run, "--prompt", "digit 3", "--num", "1", "--seed", str(body["seed"]),
                     "--steps", str(steps), "--strength", str(body["strength"]), "--out", out]) == 0
        expected = decode(open(os.path.join(out, prompt_dirname("digit 3"), "0000.png"), "rb").read())
        got = decode(base64.b64decode(reply.json()["images"][0]["b64_json"]))
        np.testing.assert_array_equal(got, expected, err_msg=f"strength {body['strength']}")


def test_max_batch_caps_the_slots_of_all_engines_together_and_idle_engines_are_freed(tiny_run):
    """Requests on three schedulers at once, 2 images each, with --max-batch 3: the images in all
    engines never exceed 3, everything is delivered, and only the default engine is left."""
    run, _ = tiny_run
    with running_server(ServeSettings(model=run, max_batch=3, max_queue=64, engine_process=False)) as (url, worker):
        peaks = []
        step = worker._step

        def counting_step(scheduler, engine):
            peaks.append((sum(e.active for e in worker._engines.values()), worker.images_in_engines(), len(worker._engines)))
            step(scheduler, engine)

        worker._step = counting_step
        bodies = [{"prompt": f"digit {d}", "num": 2, "seed": d, "steps": 4, "scheduler": sch, "strength": 0.5 * d}
                  for d, sch in enumerate(["ddim", "euler", "dpm", "ddpm", "euler", "dpm"])]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda b: _post(url, b), bodies))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        assert sum(len(r.json()["images"]) for r in replies) == 12
        assert peaks and max(p[1] for p in peaks) <= 3, peaks  # slots and engine queues, over all engines
        assert max(p[2] for p in peaks) >= 2  # several schedulers did run at once
        assert list(worker._engines) == ["ddim"]  # the others were freed when idle


def test_a_request_during_a_restart_waits_for_the_engine_when_the_server_holds_requests():
    """ServeSettings.hold_while_restarting_s (what Ray Serve replicas run with): a request that
    arrives while the engine restarts is held and served once the engine is back, instead of a
    503 at once, so that Ray's router, which counts it in flight, prefers the other replicas."""
    from invdiff.demo import shipped_base

    from .test_service import _b64_images, engine_pid

    request = {"prompt": "digit 3", "num": 2, "seed": 5, "steps": 4}
    with running_server(ServeSettings(model=shipped_base(), max_batch=2, hold_while_restarting_s=30)) as (url, worker):
        before = httpx.post(f"{url}/v1/images", json=request, timeout=60)
        assert before.status_code == 200, before.text
        first_pid = engine_pid(worker)
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503, timeout=10, what="the restart seen by /readyz")
        assert httpx.get(f"{url}/readyz").json()["status"] == "restarting"
        sent = time.monotonic()
        during = httpx.post(f"{url}/v1/images", json=request, timeout=60)
        waited = time.monotonic() - sent
        assert during.status_code == 200, during.text  # held, then served: not a 503
        assert engine_pid(worker) != first_pid and waited > 0.5  # it did wait for the new engine
        for a, b in zip(_b64_images(during), _b64_images(before)):
            np.testing.assert_array_equal(a, b)


def test_hold_while_restarting_is_validated():
    with pytest.raises(ValueError, match="hold_while_restarting_s must be a finite number >= 0"):
        ServeSettings(model="m", hold_while_restarting_s=-1)
