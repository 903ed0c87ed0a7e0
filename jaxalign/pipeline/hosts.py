"""What the processes of a multi-host run must agree on before and between phases.

On a Cloud TPU slice every host has its own boot disk. Phases hand their outputs to later phases through the work
directory (samples.json, done markers, each phase's HF model), written by process 0 and read by every process, so the
work directory must be one storage every host sees: a bucket (``gs://...``) or a shared mount. A directory that is not
shared would make hosts 1..N miss a round's model and load different weights into one sharded array; it is refused at
start, before anything compiles. Between phases every process waits for process 0's writes (:func:`barrier`).
"""
from __future__ import annotations

import uuid
from typing import Callable, TypeVar

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxalign.config import ConfigError

TOKEN_FILE = ".jaxalign-hosts"
T = TypeVar("T")


def _token_bits(token: str) -> np.ndarray:
    return np.frombuffer(uuid.UUID(token).bytes, np.uint8).astype(np.int32)


def check_shared_workdir(root: epath.Path) -> None:
    """Process 0 writes a fresh token into ``root``; every process reads it back and all agree through a collective.
    Raises ConfigError on every process when any of them does not see the token (a directory that is not shared)."""
    if jax.process_count() == 1:
        return
    marker = root / TOKEN_FILE
    token = uuid.uuid4().hex
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    # process 0's token reaches every process by a collective, the file by the storage under test
    expected = np.asarray(multihost_utils.broadcast_one_to_all(_token_bits(token)))
    multihost_utils.sync_global_devices("jaxalign: token written")
    try:
        seen = _token_bits(marker.read_text().strip())
        ok = bool(np.array_equal(seen, expected))
    except (OSError, ValueError):
        ok = False
    agreed = np.asarray(multihost_utils.process_allgather(np.asarray([ok], np.int32))).reshape(-1)
    if not agreed.all():
        missing = [int(i) for i in np.flatnonzero(agreed == 0)]
        raise ConfigError(
            f"--workdir {root} is not shared by the {jax.process_count()} processes of this run: process(es) "
            f"{missing} do not see the file process 0 wrote there. Phases hand their outputs (samples, done markers, "
            f"each phase's model) to later phases through this directory, so every host must see the same one — on "
            f"a Cloud TPU slice each host has its own boot disk. Use a bucket (--workdir gs://BUCKET/PATH) or a "
            f"mount every host shares (NFS / Filestore / gcsfuse).")


def barrier(name: str) -> None:
    """Every process waits here until all arrive (after process 0's writes of a finished phase)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_zero_first(build: Callable[[], T], name: str) -> T:
    """``build()`` on process 0, then on every other process once process 0 is done.

    For idempotent builders of files in the shared work directory (the demo assets): the others find process 0's
    finished files and reuse them instead of racing its writes (a second writer would delete and rewrite the folder
    process 0 is filling). Where the builder writes to each host's own disk instead, every host builds its own copy,
    which must then be a deterministic function of the arguments."""
    result = build() if jax.process_index() == 0 else None
    barrier(name)
    return result if jax.process_index() == 0 else build()
