"""Starting processes (jaxalign/distributed.py): which environment ``--distributed auto`` joins and with what arguments
(JAX's own detectors driven by faked environment variables and a local stand-in for the GCE metadata server), what
``on`` demands, and a real two-process start on CPU."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import pytest

from engine_script import free_port
from jaxalign import distributed

REPO = Path(__file__).resolve().parents[1]
CLUSTER_PREFIXES = ("JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_")
# the metadata of worker 0 of a two-host TPU slice (worker-network-endpoints in its name:id:ip form)
TWO_WORKERS = {"agent-worker-number": "0", "tpu-env": "", "worker-network-endpoints": "a:0:1.1.1.1,b:1:2.2.2.2"}


@pytest.fixture
def calls(monkeypatch):
    """A machine with no cluster at all (whatever this one has), a metadata address that refuses at once, and
    jax.distributed.initialize recorded instead of run."""
    for name in list(os.environ):
        if name.startswith(CLUSTER_PREFIXES) or name in ("KUBERNETES_SERVICE_HOST", "GCE_METADATA_IP"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{free_port()}")  # nothing listens there
    recorded: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return recorded


@pytest.fixture
def tpu_vm(monkeypatch):
    """What jax's cloud_tpu_init sets on a host with TPU chips and libtpu; JAX's TPU detectors look at nothing else
    before asking the metadata server or the GKE variables."""
    from jax._src.clusters import cloud_tpu_cluster

    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)


class _Metadata(http.server.BaseHTTPRequestHandler):
    attributes: dict[str, str] = {}
    google = True
    requests: list[str] = []

    def do_GET(self):
        self.requests.append(self.path)
        key = self.path.rsplit("/", 1)[-1]
        ok = self.path.startswith("/computeMetadata/v1/instance/attributes/") and key in self.attributes and \
            self.headers.get("Metadata-Flavor") == "Google"
        body = (self.attributes[key] if ok else "not found").encode()
        self.send_response(200 if ok else 404)
        if self.google:
            self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata(monkeypatch):
    """A local stand-in for the GCE metadata server; set ``.attributes`` (and ``.google``) on the returned class."""
    handler = type("Handler", (_Metadata,), {"attributes": {}, "google": True, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
    yield handler
    server.shutdown()
    server.server_close()


def _jax_resolves(method: str):
    """What JAX itself derives (coordinator, processes, id) for the detection method ``initialize`` names."""
    from jax._src import clusters

    return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, method, 10)[:3]


# ---- one host: nothing -----------------------------------------------------------------------------------------------

def test_one_plain_host_starts_nothing_and_decides_fast(calls):
    t0 = time.perf_counter()
    assert distributed.initialize("auto") is None
    assert time.perf_counter() - t0 < 2.0
    assert distributed.initialize("off") is None
    assert calls == []


def test_the_metadata_probe_gives_up_within_its_timeout(monkeypatch):
    """An address where packets vanish (no route answers): the probe returns False after its short timeout instead of
    JAX's six 60-second tries. 192.0.2.1 is TEST-NET-1, never routed."""
    monkeypatch.setenv("GCE_METADATA_IP", "192.0.2.1")
    t0 = time.perf_counter()
    assert distributed.metadata_answers(timeout=0.3) is False
    assert time.perf_counter() - t0 < 1.5


def test_off_never_starts_even_on_a_cluster(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert distributed.initialize("off") is None and calls == []


def test_an_initialized_process_is_left_alone(calls, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.initialize("on") is None and calls == []


# ---- TPU VMs ---------------------------------------------------------------------------------------------------------

def test_gcloud_tpu_pod_found_through_the_metadata_server(calls, tpu_vm, metadata):
    metadata.attributes = {"agent-worker-number": "1", "tpu-env": "ACCELERATOR_TYPE: 'v5litepod-16'\n",
                           "worker-network-endpoints": "w0:0:127.0.0.1,w1:1:127.0.0.2,w2:2:127.0.0.3,w3:3:127.0.0.4"}
    cluster = distributed.initialize("auto")
    assert cluster == distributed.Cluster("GceTpuCluster", 4, "gcetpu")
    assert metadata.requests[0] == "/computeMetadata/v1/instance/attributes/agent-worker-number"
    assert calls == [{"cluster_detection_method": "gcetpu"}]
    # given that name, JAX reads the same pod: coordinator = worker 0, 4 processes, this one is worker 1
    assert _jax_resolves("gcetpu") == ("127.0.0.1:8482", 4, 1)


def test_single_host_tpu_vm_does_not_initialise(calls, tpu_vm, metadata):
    metadata.attributes = {"agent-worker-number": "0", "tpu-env": "", "worker-network-endpoints": "w0:0:10.0.0.7"}
    assert distributed.initialize("auto") is None and calls == []


def test_a_metadata_server_that_is_not_googles_is_ignored(calls, tpu_vm, metadata):
    metadata.attributes = TWO_WORKERS
    metadata.google = False
    assert distributed.metadata_answers() is False
    assert distributed.initialize("auto") is None and calls == []


def test_metadata_alone_without_tpu_chips_is_not_a_tpu_pod(calls, metadata):
    """A GCE VM without TPUs answers the metadata server too (here even with pod attributes): JAX's own check that
    this host has TPU chips comes first."""
    metadata.attributes = TWO_WORKERS
    assert distributed.initialize("auto") is None and calls == []


def test_a_host_jax_found_without_tpu_chips_never_asks_the_metadata_server(calls, tpu_vm, metadata, monkeypatch):
    metadata.attributes = TWO_WORKERS
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # what `import jax` sets where it counts no TPU chips
    assert distributed.initialize("auto") is None and calls == []
    assert metadata.requests == []


@pytest.mark.parametrize("slices, slice_id", [(1, 0), (2, 1)])
def test_gke_tpu_slices_from_their_variables(calls, tpu_vm, metadata, monkeypatch, slices, slice_id):
    """GKE sets the worker list and id, a multislice job the MEGASCALE_* variables; JAX asks the node's metadata
    server for the rest (here: no agent-worker-number, so not a gcloud TPU VM, and an empty tpu-env)."""
    metadata.attributes = {"tpu-env": ""}
    if slices > 1:
        monkeypatch.setenv("MEGASCALE_COORDINATOR_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "127.0.0.1,host-1,host-2,host-3")
    monkeypatch.setenv("TPU_WORKER_ID", "2")
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", str(slices))
    monkeypatch.setenv("MEGASCALE_SLICE_ID", str(slice_id))
    assert distributed.initialize("auto") == distributed.Cluster("GkeTpuCluster", 4 * slices, "gketpu")
    assert calls == [{"cluster_detection_method": "gketpu"}]
    assert _jax_resolves("gketpu") == ("127.0.0.1:8482", 4 * slices, 2 + 4 * slice_id)


def test_gke_single_host_does_not_initialise(calls, tpu_vm, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")
    assert distributed.initialize("auto") is None and calls == []


# ---- GPU / CPU clusters ----------------------------------------------------------------------------------------------

def _slurm(monkeypatch, ntasks: int, procid: int):
    for k, v in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[007-008]", "SLURM_NTASKS": str(ntasks),
                 "SLURM_PROCID": str(procid), "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": str(ntasks)}.items():
        monkeypatch.setenv(k, v)


def test_slurm_job(calls, monkeypatch):
    _slurm(monkeypatch, 2, 1)
    assert distributed.initialize("auto") == distributed.Cluster("SlurmCluster", 2, "slurm")
    assert calls == [{"cluster_detection_method": "slurm"}]
    assert _jax_resolves("slurm") == (f"node007:{4242 % 4096 + 61440}", 2, 1)


def test_one_task_slurm_job_does_not_initialise(calls, monkeypatch):
    _slurm(monkeypatch, 1, 0)
    assert distributed.initialize("auto") is None and calls == []


def test_open_mpi_job(calls, monkeypatch):
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert distributed.initialize("auto") == distributed.Cluster("OmpiCluster", 8, "ompi")
    assert calls == [{"cluster_detection_method": "ompi"}]
    assert _jax_resolves("ompi")[1:] == (8, 5)


def test_auto_takes_the_jax_variables_when_all_three_are_set(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:7000")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert distributed.initialize("auto") == distributed.Cluster("env", 3)
    assert calls == [{"coordinator_address": "10.0.0.2:7000", "num_processes": 3, "process_id": 2}]


# ---- on -------------------------------------------------------------------------------------------------------------

def test_on_passes_the_three_variables(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.initialize("on") == distributed.Cluster("env", 2)
    assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


@pytest.mark.parametrize("env, message", [
    ({}, "Missing: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "Missing: JAX_PROCESS_ID."),
    ({"JAX_COORDINATOR_ADDRESS": "hostonly", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "expected host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "0 <= id < N"),
])
def test_on_rejects_missing_or_bad_variables(calls, monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(distributed.DistributedError, match=message.replace(".", r"\.")):
        distributed.initialize("on")
    assert calls == []


def test_unknown_mode(calls):
    with pytest.raises(distributed.DistributedError, match="choose one of auto, on, off"):
        distributed.initialize("yes")


# ---- a real start ---------------------------------------------------------------------------------------------------

_SCRIPT = textwrap.dedent("""
    import sys

    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh

    from jaxalign import distributed
    from jaxalign.sampling.memory import agreed_budget_bytes

    cluster = distributed.initialize("on")
    ids = multihost_utils.process_allgather(np.array([jax.process_index()]))
    # the sampler's memory budget: this process's own (1 or 2 GiB + a little) on a mesh of its own devices, the
    # smallest (rounded down to MiB) on a mesh over both processes
    own = (1 + jax.process_index()) * 2**30 + 12345
    budgets = [agreed_budget_bytes(own, Mesh(np.array(d), ("data",))) for d in (jax.devices(), jax.local_devices())]
    fields = (cluster.num_processes, jax.process_count(), jax.process_index(), jax.device_count(),
              jax.local_device_count(), jax.config.jax_cpu_collectives_implementation, sorted(ids.ravel().tolist()),
              *budgets)
    # one write: gloo's C++ logging shares the descriptor, and print's pieces once let it in mid-line
    sys.stdout.write("RESULT " + " ".join(map(str, fields)) + "\\n")
    sys.stdout.flush()
    jax.distributed.shutdown()
""")


def test_two_real_processes_on_cpu(tmp_path):
    script = tmp_path / "start.py"
    script.write_text(_SCRIPT)
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
    flags = " ".join(f for f in base.get("XLA_FLAGS", "").split() if "device_count" not in f)
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2".strip())
    procs = [subprocess.Popen([sys.executable, str(script)], env={**base, "JAX_PROCESS_ID": str(i)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, (out + err)[-3000:]
        result = next(line for line in out.splitlines() if line.startswith("RESULT"))
        # 2 processes of 2 CPU devices each: 4 global devices, a gloo all-gather that saw both process ids; the
        # budgets: process 0's 1 GiB agreed by both, each its own on its own devices
        own = (1 + i) * 2**30 + 12345
        assert result == f"RESULT 2 2 {i} 4 2 gloo [0, 1] {2**30} {own}", (out + err)[-3000:]
