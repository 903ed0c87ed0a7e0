"""Test-wide setup: 8 virtual CPU devices so every mesh shape runs without an accelerator.

The environment variables must be set before jax is imported anywhere, which is why they live here at module level.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(os.environ.get("JAXALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data slices and tokenizers (../shared/data); tests that need them skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (set JAXALIGN_SHARED_DATA)")
    return SHARED_DATA


def pytest_configure(config):
    """Under pytest-xdist, hand tests to the workers one at a time (``--maxschedchunk 1``) rather than in chunks of
    a quarter of the suite each: with the order below, a chunk would give one worker all the long tests."""
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    """Run the modules that hold ``slow`` tests first, and a module's slow tests before its others.

    pytest-xdist hands tests out in this order (one at a time, above), so the long end-to-end runs start first and the
    suite ends on short tests rather than on one worker finishing a 9-minute test alone. Modules stay contiguous in
    each worker's share, so a module-scoped fixture is still built once per worker."""
    def is_slow(item) -> bool:
        return item.get_closest_marker("slow") is not None

    modules: dict = {}
    for item in items:
        modules.setdefault(item.module.__name__, []).append(item)
    ordered = sorted(modules.values(), key=lambda group: not any(map(is_slow, group)))  # stable: file order kept
    items[:] = [item for group in ordered for item in sorted(group, key=lambda item: not is_slow(item))]
