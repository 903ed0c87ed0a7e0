"""A local Google Cloud Storage for the tests: ``gcp-storage-emulator`` serving the GCS JSON API on 127.0.0.1.

google-cloud-storage and gcsfs (epath's backend) find it through ``STORAGE_EMULATOR_HOST``, tensorstore (orbax's array
store) through ``TENSORSTORE_GCS_HTTP_URL``.

Run as a script, this file starts the emulator with one gap filled: its media downloads leave out the
``x-goog-generation`` header that GCS sends with every object read. tensorstore's gcs driver reads it to learn the
generation of what it read; orbax's OCDBT manifest is read back and rewritten during an asynchronous save of many
arrays, and without the header that save fails with "Malformed StorageGeneration". Nothing else is changed.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

GCSFS_QUIET = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # no storage-control API here: skip gcsfs's bucket probe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(url: str) -> dict[str, str]:
    # no credentials here: tensorstore then asks the GCE metadata server, whose name does not resolve on this machine
    # and costs about a minute of retries per process; a closed local port makes that lookup fail at once
    no_metadata = {"GCE_METADATA_ROOT": "127.0.0.1:1", "GCE_METADATA_HOST": "127.0.0.1:1"}
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, **GCSFS_QUIET, **no_metadata}


@contextlib.contextmanager
def running(bucket: str, *, timeout: float = 60):
    """Start the emulator with ``bucket`` on a free port; yields its URL; stops it on exit."""
    port = _free_port()
    # its output goes to a file, never a pipe: the server prints a traceback for every dropped connection, and an
    # unread pipe fills up and stops it mid-request
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, __file__, "start", "--host=127.0.0.1", f"--port={port}",
                             f"--default-bucket={bucket}", "--in-memory", "--quiet"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the GCS emulator exited: {log.read().decode()[-2000:]}")
            if time.time() - t0 > timeout:
                raise RuntimeError(f"the GCS emulator did not answer on {url} within {timeout} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _serve(argv: list[str]) -> None:
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the original handler has answered 404
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    objects.download = download_with_generation  # before the server module binds its routes
    from gcp_storage_emulator.__main__ import main

    main(argv)


if __name__ == "__main__":
    os.environ.update(GCSFS_QUIET)
    _serve(sys.argv[1:])
