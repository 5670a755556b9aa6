"""`invdiff serve` under Ray Serve (metrics per replica and Ray's export of them, the drain deadline,
SIGTERM), and the service's liveness when the engine's first warm-up fails and its hold on the
port while the model loads.

Servers are real: a local Ray with Ray Serve's proxy, or the CLI in a subprocess, driven by httpx.
The fixtures and helpers are tests/test_service.py's.
"""
import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict

import httpx
import pytest

from invdiff.serve.settings import ServeSettings
from tests import test_service
from tests.test_service import _post_keeping_reply, _sigterm_during_a_request, free_port, wait_for, wait_ready
from tests.test_service import tiny_run  # noqa: F401 (the fixture, built once for this module)

# Ray's workers send their metrics to the node's agent every metrics_report_interval_ms (10 s by
# default): every second here, so that the tests wait seconds for Ray's export, not tens.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_metrics_report_interval_ms": "1000"}
# The samples of a Prometheus counter or histogram that may never go down.
CUMULATIVE_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


def samples(text: str) -> dict:
    """{(sample name, sorted label items): value} of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def cumulative(scraped: dict) -> dict:
    return {key: value for key, value in scraped.items() if key[0].endswith(CUMULATIVE_SUFFIXES)}


def by_label(scraped: dict, name: str, label: str) -> dict:
    """{label value: value} of the samples called `name`."""
    return {dict(labels)[label]: value for (sample, labels), value in scraped.items() if sample == name and label in dict(labels)}


def labelled_metric(url: str, name: str) -> float:
    """tests/test_service.py's `metric` for a server whose series carry labels (Ray mode: the
    replica): the sum of the series called `name`."""
    scraped = samples(httpx.get(f"{url}/metrics", timeout=5).text)
    values = [value for (sample, _), value in scraped.items() if sample == name]
    assert values, f"{name} not in /metrics"
    return sum(values)


def never_decrease(history: dict) -> list:
    """The series of `history` ({series: values in scrape order}) that went down somewhere."""
    return [(key, values) for key, values in history.items() if any(b < a for a, b in zip(values, values[1:]))]


# ------------------------------------------------------------------ Ray: metrics per replica
def test_ray_metrics_are_per_replica_never_go_backwards_and_are_exported_by_ray(tiny_run, monkeypatch):
    """Two replicas behind Ray's proxy. Before, /metrics through the proxy was whichever replica
    answered, one unlabelled invdiff_images_total that read 48, then 64, then 48. Now every series
    names its replica: over many scrapes no cumulative series goes down, and the replicas'
    invdiff_images_total add up to the images sent. Ray's metrics agent exports the same counts
    (ray_invdiff_images_total, tagged by replica) on the node's metrics export port."""
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)  # before ray.init: Ray's processes read them at their start
    import ray
    from ray import serve

    from invdiff.serve.ray_serve import deployment

    run, _ = tiny_run
    port, export_port = free_port(), free_port()
    url, export_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{export_port}/metrics"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=export_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(ServeSettings(model=run, device="cpu", max_batch=4), replicas=2, cpus_per_replica=0.5),
                  name="invdiff", route_prefix="/")
        wait_ready(url, timeout=180)
        history = defaultdict(list)

        def scrape(times: int) -> dict:
            for _ in range(times):
                scraped = samples(httpx.get(f"{url}/metrics", timeout=10).text)
                for key, value in cumulative(scraped).items():
                    history[key].append(value)
            return scraped

        images = 0
        for burst in range(3):
            body = {"prompt": "digit 3", "num": burst + 1, "seed": burst, "steps": 2}
            results = []
            threads = [threading.Thread(target=lambda: results.append(httpx.post(f"{url}/v1/images", json=body, timeout=120)))
                       for _ in range(6)]
            for t in threads:
                t.start()
            scrape(4)  # while they run
            for t in threads:
                t.join()
            assert [r.status_code for r in results] == [200] * 6, [r.text for r in results]
            images += 6 * body["num"]
            scrape(6)

        per_replica = {}

        def every_replica_counted() -> bool:  # the proxy picks the replica: scrape until both were seen since
            per_replica.update(by_label(scrape(1), "invdiff_images_total", "replica"))
            return len(per_replica) == 2 and sum(per_replica.values()) == images

        wait_for(every_replica_counted, timeout=60, what=f"two replicas' invdiff_images_total adding up to {images}")
        assert not never_decrease(history), never_decrease(history)
        replicas = set(per_replica)
        print(f"\n/metrics through the proxy: {len(history)} cumulative series over {max(map(len, history.values()))} "
              f"scrapes, none went down; images per replica {per_replica}, {images} sent")

        # Ray's metrics agent: every replica's counts, tagged with Ray's own replica id, which is the label above.
        exported_history = defaultdict(list)
        exported = {}

        def ray_exported_every_count() -> bool:
            scraped = samples(httpx.get(export_url, timeout=10).text)
            for key, value in cumulative(scraped).items():
                if key[0].startswith("ray_invdiff_"):
                    exported_history[key].append(value)
            exported.clear()
            exported.update(by_label(scraped, "ray_invdiff_images_total", "replica"))
            return exported == per_replica

        wait_for(ray_exported_every_count, timeout=60, what=f"Ray's export of {per_replica}")
        assert not never_decrease(exported_history), never_decrease(exported_history)
        scraped = samples(httpx.get(export_url, timeout=10).text)
        exported_names = sorted({name for name, _ in scraped if name.startswith("ray_invdiff_")})
        assert set(by_label(scraped, "ray_invdiff_slots_total", "replica")) == replicas, exported_names  # a gauge set once, kept
        statuses = {(dict(labels)["replica"], dict(labels)["status"]): value for (name, labels), value in scraped.items()
                    if name == "ray_invdiff_requests_total"}
        assert sum(value for (_, status), value in statuses.items() if status == "200") == 18
        assert {dict(labels).get("deployment") for (name, labels) in scraped if name == "ray_invdiff_images_total"} == {"invdiff"}
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_metrics_export_port_is_a_ray_option_for_the_ray_it_starts(tiny_run, capsys, monkeypatch):
    from invdiff.cli import main

    run, _ = tiny_run
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "--model", run, "--metrics-export-port", "9100"]) == 2
    assert "--metrics-export-port applies to --ray" in capsys.readouterr().err
    assert main(["serve", "--model", run, "--ray", "--metrics-export-port", "70000"]) == 2
    assert "--metrics-export-port must be in 1..65535, got 70000" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert main(["serve", "--model", run, "--ray", "--metrics-export-port", "9100"]) == 2
    assert "the cluster at RAY_ADDRESS exports on the port its nodes were started with" in capsys.readouterr().err


# ------------------------------------------------------------------ Ray: SIGTERM and the drain deadline
def _sigterm_and_wait(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """End a server subprocess as a supervisor does: SIGTERM, then kill if it outlives `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def _ray_cli(run: str, port: int, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "invdiff.cli", "serve", "--model", run, "--ray", "--port", str(port),
                             "--device", "cpu", "--max-batch", "2", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_on_ray_serve_drains_in_flight_requests_and_exits_0(tiny_run, monkeypatch):
    """`invdiff serve --ray`: SIGTERM takes Ray Serve's shutdown path (the app is deleted, its
    replica finishes its in-flight request, Serve and Ray stop) and the process exits with 0.
    Before: the request was cut ("Server disconnected without sending a response") and the
    process died with 134 after a native stack dump."""
    monkeypatch.setattr(test_service, "metric", labelled_metric)  # the helper's wait reads the replica's labelled gauge
    run, _ = tiny_run
    port = free_port()
    proc = _ray_cli(run, port, "--drain-seconds", "60")
    reply, answered, rc, exited, log = _sigterm_during_a_request(
        proc, f"http://127.0.0.1:{port}", {"prompt": "digit 3", "num": 2, "steps": 300, "seed": 0},
        ready_timeout=180, sampling_timeout=30, wait=120)
    print(f"Ray SIGTERM: the in-flight request answered {answered:.2f} s and the process exited {exited:.2f} s after it")
    assert isinstance(reply, httpx.Response), (reply, log)
    assert reply.status_code == 200, (reply.status_code, reply.text, log)  # the in-flight request finished
    assert len(reply.json()["images"]) == 2
    assert rc == 0, log
    assert "SIGTERM: draining for at most 60 s" in log and "drained and deleted" in log, log
    assert "SIGTERM received" not in log, log  # Ray's native handler, with its stack dump


def test_a_request_still_running_at_the_ray_drain_deadline_gets_the_json_503(tiny_run):
    """`invdiff serve --ray --drain-seconds 3` and a request that needs minutes: at SIGTERM Ray
    Serve stops the replica and kills it 3 s later. The replica's app drains from the moment Ray
    begins that shutdown and answers the request ANSWER_BEFORE_KILL_S (a quarter of 3 s) before
    the kill with the service's JSON 503 and Retry-After, as `invdiff serve` does without Ray.
    Before: Ray killed the replica and its proxy answered a plain-text 500. Also: the metrics
    port given with --metrics-export-port serves Ray's export of the replica's metrics."""
    from invdiff.serve.ray_serve import answer_deadline

    run, _ = tiny_run
    drain = 3.0
    port, export_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _ray_cli(run, port, "--drain-seconds", str(drain), "--metrics-export-port", str(export_port))
    try:
        wait_ready(url, timeout=180)
        # 16 images of 1000 steps, 2 at a time: minutes of sampling, far past the deadline.
        thread, replies = _post_keeping_reply(url, {"prompt": "digit 3", "num": 16, "steps": 1000, "seed": 0}, timeout=120)
        wait_for(lambda: labelled_metric(url, "invdiff_slots_occupied") == 2, timeout=30, what="the request sampling")

        def exported_sampling() -> bool:
            scraped = samples(httpx.get(f"http://127.0.0.1:{export_port}/metrics", timeout=5).text)
            return 2.0 in by_label(scraped, "ray_invdiff_slots_occupied", "replica").values()

        wait_for(exported_sampling, timeout=60, what="Ray's export on --metrics-export-port")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        answered = time.monotonic() - signalled
        rc = proc.wait(timeout=60)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.stdout.read()
    print(f"Ray SIGTERM with a {drain:g} s drain: the request answered after {answered:.2f} s, the process exited after {exited:.2f} s")
    reply = replies[0]
    assert isinstance(reply, httpx.Response), (reply, log)
    assert reply.status_code == 503, (reply.status_code, reply.text, log)
    assert reply.headers["content-type"] == "application/json" and reply.headers["retry-after"] == "1"
    assert "drain deadline passed" in reply.json()["detail"]
    assert reply.headers["x-served-by"]  # the replica's app answered, not Ray's proxy
    # The work went on until the app's deadline (from the signal: Ray begins the shutdown a little
    # later), and was answered before Ray's kill would have cut it.
    assert answer_deadline(drain) <= answered <= drain + 2.0, log
    assert rc == 0, log


# ------------------------------------------------------------------ liveness when the first warm-up fails
def serve_script(tmp_path, patch: str) -> str:
    """A script that runs `invdiff serve` (its arguments) after `patch`, a piece of code run at
    import: the engine process is spawned, so it imports the script as its main module and runs
    the patch too."""
    script = tmp_path / "serve_patched.py"
    script.write_text(textwrap.dedent(patch) + textwrap.dedent("""
        if __name__ == "__main__":
            import sys

            from invdiff.cli import main

            sys.exit(main(sys.argv[1:]))
        """))
    return str(script)


FAILING_WARM_UP = """
    from invdiff.serve.worker import EngineWorker

    def _warm_up(self):  # the model loaded; its first sample fails (a device out of memory, a kernel that does not build)
        raise RuntimeError("CUDA error: out of memory (injected by the test)")

    EngineWorker._warm_up = _warm_up
    """


@pytest.mark.parametrize("engine_in_process", [False, True], ids=["engine process", "engine thread"])
def test_a_failed_first_warm_up_fails_healthz_and_each_request_is_a_503_naming_it(tiny_run, tmp_path, engine_in_process):
    """The model loads but the engine's first sample fails. Before, both worker kinds stayed up
    with /healthz 200 and answered every request with a 500: nothing restarted them. Now
    /healthz is 503 (a supervisor restarts the server), and a request gets a JSON 503 naming the
    cause."""
    run, _ = tiny_run
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--model", run, "--port", str(port), "--max-batch", "2"] + (["--engine-in-process"] if engine_in_process else [])
    proc = subprocess.Popen([sys.executable, serve_script(tmp_path, FAILING_WARM_UP), "serve", *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def warm_up_over() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).json()["status"] != "loading"
            except httpx.HTTPError:
                return False

        wait_for(warm_up_over, timeout=120, what="the warm-up's end")
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed", ready.text
        health = httpx.get(f"{url}/healthz")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "failed"
        assert "the engine failed to warm up" in health.json()["detail"] and "CUDA error: out of memory" in health.json()["detail"]
        reply = httpx.post(f"{url}/v1/images", json={"prompt": "digit 3", "steps": 2}, timeout=30)
        assert reply.status_code == 503 and reply.headers["content-type"] == "application/json", reply.text
        assert "the engine failed to warm up" in reply.json()["detail"] and "CUDA error: out of memory" in reply.json()["detail"]
    finally:
        _sigterm_and_wait(proc)


def test_ray_check_health_raises_once_the_first_warm_up_failed(tiny_run, monkeypatch):
    """Ray Serve replaces a replica whose check_health raises: so it raises when the first
    warm-up failed (before, it passed, and Ray kept a replica that failed every request)."""
    import dataclasses

    from invdiff.serve.ray_serve import InvDiffReplica
    from invdiff.serve.worker import EngineWorker

    def failing_warm_up(self):
        raise RuntimeError("CUDA error: out of memory (injected by the test)")

    monkeypatch.setattr(EngineWorker, "_warm_up", failing_warm_up)
    replica = InvDiffReplica(dataclasses.asdict(ServeSettings(model=tiny_run[0], max_batch=2, device="cpu", engine_process=False)))
    replica.worker.start()  # what the app's start does on the replica
    try:
        assert replica.worker.ready.wait(60)
        with pytest.raises(RuntimeError, match=r"the engine failed to warm up \(RuntimeError: CUDA error: out of memory"):
            replica.check_health()
    finally:
        replica.worker.stop(0.0)


# ------------------------------------------------------------------ the port is held from the start-up check on
SLOW_LOAD = """
    import os
    import time

    from invdiff.serve.engine_process import EngineProcess

    _load = EngineProcess.load

    def load(self):  # a model load the test ends: it says when it begins, and waits for the test's word
        open(os.environ["TEST_LOADING"], "w").close()
        while not os.path.exists(os.environ["TEST_LOAD_NOW"]):
            time.sleep(0.05)
        _load(self)

    EngineProcess.load = load
    """


def test_the_port_is_held_while_the_model_loads_and_then_served(tiny_run, tmp_path):
    """`invdiff serve` holds its port from its start-up check on: while the model loads, another
    server cannot bind it (as uvicorn binds: SO_REUSEADDR), and a connection made then is
    answered once the server runs. Before, the check released the port and uvicorn bound it again
    only after the load, so another process could take it meanwhile and the start failed late."""
    run, _ = tiny_run
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    loading, load_now = tmp_path / "loading", tmp_path / "load-now"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEST_LOADING": str(loading), "TEST_LOAD_NOW": str(load_now)}
    proc = subprocess.Popen([sys.executable, serve_script(tmp_path, SLOW_LOAD), "serve", "--model", run, "--port", str(port),
                             "--max-batch", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(loading.exists, timeout=60, what="the model load beginning")
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with other, pytest.raises(OSError) as taken:
            other.bind(("127.0.0.1", port))
            other.listen()
        assert taken.value.errno == errno.EADDRINUSE
        early = socket.create_connection(("127.0.0.1", port), timeout=60)  # waits in the backlog
        with early:
            early.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            load_now.touch()
            answer = b""
            while chunk := early.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b'{"status":"alive"}' in answer, answer
        wait_ready(url)
        reply = httpx.post(f"{url}/v1/images", json={"prompt": "digit 3", "steps": 2, "seed": 0}, timeout=60)
        assert reply.status_code == 200, reply.text
    finally:
        load_now.touch()
        _sigterm_and_wait(proc)
        log = proc.stdout.read()
    assert "Traceback" not in log, log
