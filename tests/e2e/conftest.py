"""Starts a real `mpirun ... quilt serve` job on loopback for the end-to-end tests."""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "golden" / "fixtures"


def quilt_binary():
    b = os.environ.get("QUILT_BINARY", str(ROOT / "build" / "quilt"))
    if not os.path.exists(b):
        pytest.fail(f"quilt binary not found at {b} (set QUILT_BINARY)")
    return b


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    def __init__(self, config_text, ranks, name):
        self.dir = tempfile.mkdtemp(prefix=f"quilt-e2e-{name}-")
        self.port = free_port()
        cfg = pathlib.Path(self.dir) / "config.yaml"
        cfg.write_text(config_text.replace("PORT", str(self.port)))
        self.log = open(pathlib.Path(self.dir) / "job.log", "w+")
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_rmaps_base_oversubscribe="1")
        self.proc = subprocess.Popen(
            ["mpiexec", "--bind-to", "none", "-np", str(ranks), quilt_binary(), "serve", "--config", str(cfg)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"quilt serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"quilt serve did not become healthy in 120 s:\n{self.output()}")

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-20000:]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def fixture_expected(name):
    return json.loads((FIXTURES / name / "expected.json").read_text())


@pytest.fixture(scope="session")
def golden_job():
    """2 replicas x TP 2 serving the GQA golden fixture (5 ranks), its PEFT adapters, and a broken one."""
    broken_root = pathlib.Path(tempfile.mkdtemp(prefix="quilt-e2e-broken-"))
    shutil.copytree(FIXTURES / "gqa-f32-new" / "adapters" / "b-r8-all", broken_root / "broken")
    with open(broken_root / "broken" / "adapter_model.safetensors", "r+b") as f:
        f.truncate(200)
    job = Job(f"""
model: {{path: {FIXTURES / 'gqa-f32-new'}, id: gqa-tiny}}
replicas: 2
tensor_parallel: 2
http: {{port: PORT, max_concurrent_requests: 2000}}
limits: {{max_input_length: 200, max_total_tokens: 256, max_stop_sequences: 4}}
adapters: {{roots: [{FIXTURES / 'gqa-f32-new' / 'adapters'}, {broken_root}], slots: 2, max_rank: 16, preload: [a-r4-qv], retry_backoff_s: 1}}
scheduler: {{max_batch_total_tokens: 4096, max_batch_prefill_tokens: 1024}}
health: {{heartbeat_interval_s: 0.2}}
""", 5, "golden")
    yield job
    job.stop()
    shutil.rmtree(broken_root, ignore_errors=True)


@pytest.fixture(scope="module", params=[1, 4], ids=["tp1", "tp4"])
def tp_job(request):
    """One replica at tensor parallel 1 or 4 on the same fixture and adapters."""
    tp = request.param
    job = Job(f"""
model: {{path: {FIXTURES / 'gqa-f32-new'}, id: gqa-tiny}}
replicas: 1
tensor_parallel: {tp}
http: {{port: PORT}}
limits: {{max_input_length: 200, max_total_tokens: 256}}
scheduler: {{max_batch_total_tokens: 4096, max_batch_prefill_tokens: 1024}}
adapters: {{roots: [{FIXTURES / 'gqa-f32-new' / 'adapters'}], slots: 3, max_rank: 16}}
health: {{heartbeat_interval_s: 0.2}}
""", 1 + tp, f"tp{tp}")
    yield job
    job.stop()
