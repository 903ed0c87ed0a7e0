"""Starting one process of several: ``jax.distributed`` on multi-host TPU slices, GPU / CPU clusters, plain machines.

``initialize(mode)`` runs before anything touches a device:

- ``"auto"`` (the default): the three ``JAX_*`` variables below when all are set; else the multi-host environment JAX
  itself detects — a Cloud TPU VM created with gcloud (found through the GCE metadata server), GKE
  (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES``), SLURM, Open MPI, Kubernetes — when it counts more than one
  process; else nothing (one host, a single-host TPU VM included).
- ``"on"``: one process of N on any machines, CPU included, from ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (0 .. N-1); all three are required.
- ``"off"``: never.
"""
from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.request
import warnings

import jax

MODES = ("auto", "on", "off")
VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# The GCE metadata server (JAX reads the same, overridable the same way); the address, not metadata.google.internal,
# so that off GCP the probe never waits on a DNS lookup, which no socket timeout bounds.
METADATA_IP = "169.254.169.254"
PROBE_TIMEOUT_S = 0.5


class DistributedError(ValueError):
    """A process set-up that cannot start; the message names the variable and what it should hold."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What ``initialize`` joined: the environment ("env" for the JAX_* variables, else JAX's detector class), its
    number of processes, and the ``cluster_detection_method`` name JAX knows it by (None: JAX's default scan)."""

    name: str
    num_processes: int
    method: str | None = None


def _jax_cluster_types() -> list:
    """JAX's own multi-host detectors, in the order ``jax.distributed.initialize()`` tries them.

    They are public only through ``jax.distributed.initialize()``, which cannot answer "one host: do nothing" (on a
    single-host TPU VM it starts a one-process service; elsewhere it raises): hence ``jax._src``, here and only here.
    A JAX release that moves them leaves ``auto`` with the JAX_* variables only (an empty list, never an error)."""
    try:
        from jax._src import clusters

        return [c for c in clusters.ClusterEnv._cluster_types if not getattr(c, "opt_in_only_method", False)]
    except (ImportError, AttributeError):
        return []


def metadata_answers(key: str = "agent-worker-number", timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a GCE metadata server answers for this instance attribute within ``timeout`` seconds.

    JAX's own probe retries six times with a 60 s timeout each: fine on a TPU VM, a minute of waiting elsewhere. This
    one decides first, in well under a second off GCP; only when it succeeds does JAX's detection run."""
    host = os.environ.get("GCE_METADATA_IP", METADATA_IP)
    req = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                 headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            # another cloud's metadata service can sit at the same address: only Google's sets this header
            return resp.status == 200 and resp.headers.get("Metadata-Flavor") == "Google"
    except (OSError, ValueError):  # URLError, timeouts, refused / unreachable, a malformed GCE_METADATA_IP
        return False


def _present(env) -> bool:
    # `import jax` sets TPU_SKIP_MDS_QUERY on a host without TPU chips, and JAX's detector then says no: no probe
    if getattr(env, "name", "") == "gcetpu" and ("TPU_SKIP_MDS_QUERY" in os.environ or not metadata_answers()):
        return False
    try:
        with warnings.catch_warnings():
            # JAX warns on every Kubernetes pod without the `kubernetes` package (Colab among them): not our case
            warnings.simplefilter("ignore")
            return bool(env.is_env_present())
    except Exception:  # a half-configured environment is not one we can start from
        return False


def detect() -> Cluster | None:
    """The multi-host environment ``auto`` would start from, or None (one host)."""
    if all(os.environ.get(v) for v in VARIABLES):
        n = _env_settings()[1]
        return Cluster("env", n) if n > 1 else None
    for env in _jax_cluster_types():
        if not _present(env):
            continue
        try:
            n = int(env.get_process_count())
        except Exception as e:
            raise DistributedError(
                f"--distributed auto: this looks like a {env.__name__} environment, but JAX could not count its "
                f"processes ({type(e).__name__}: {e}). Pass --distributed off to run this host alone, or --distributed "
                f"on with {', '.join(VARIABLES)} set.") from None
        # a single-host TPU VM (one worker), a one-task SLURM job...: nothing to coordinate
        return Cluster(env.__name__, n, getattr(env, "name", "") or None) if n > 1 else None
    return None


def _env_settings() -> tuple[str, int, int]:
    missing = [v for v in VARIABLES if not os.environ.get(v, "").strip()]
    if missing:
        raise DistributedError(
            f"--distributed on needs {', '.join(VARIABLES)} set on every process: the coordinator's host:port "
            f"(process 0's machine, a free port), the number of processes N and this process's id 0..N-1. Missing: "
            f"{', '.join(missing)}. On a TPU pod, GKE, SLURM or Open MPI use --distributed auto (the default), which "
            f"finds them by itself.")
    address = os.environ["JAX_COORDINATOR_ADDRESS"].strip()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port of process 0, e.g. "
                               f"10.0.0.2:1234.")
    try:
        n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except ValueError:
        raise DistributedError(f"JAX_NUM_PROCESSES={os.environ['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                               f"{os.environ['JAX_PROCESS_ID']!r} must be integers.") from None
    if n < 1 or not 0 <= pid < n:
        raise DistributedError(f"JAX_NUM_PROCESSES={n}, JAX_PROCESS_ID={pid}: need N >= 1 and 0 <= id < N.")
    return address, n, pid


def initialize(mode: str = "auto") -> Cluster | None:
    """Start this process's part of a multi-process run (see the module docstring); returns what it joined, or None.

    Must run before the first device is touched. Safe to call twice (the second call does nothing)."""
    if mode not in MODES:
        raise DistributedError(f"--distributed {mode!r}: choose one of {', '.join(MODES)}.")
    if mode == "off" or jax.distributed.is_initialized():
        return None
    if mode == "on":
        address, n, pid = _env_settings()
        cluster, kwargs = Cluster("env", n), dict(coordinator_address=address, num_processes=n, process_id=pid)
    else:
        cluster = detect()
        if cluster is None:
            return None
        if cluster.name == "env":
            address, n, pid = _env_settings()
            kwargs = dict(coordinator_address=address, num_processes=n, process_id=pid)
        else:
            # JAX repeats its detection of that environment and reads coordinator, count and id from it
            kwargs = {} if cluster.method is None else dict(cluster_detection_method=cluster.method)
    # CPU processes exchange collectives through gloo (harmless where the arrays live on TPU / GPU)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return cluster
