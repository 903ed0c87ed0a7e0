"""docs/quickstart.md, followed as written: its five commands, read from the page's first bash block, run in order in a
temporary directory, and their results checked.

Two substitutions, both because the suite runs offline and already inside an installed environment: the first command
(``python3 -m venv .venv && pip install -e .``) is replaced by this interpreter's environment (a fresh install is what
``.ci/run`` checks with the README's commands), and the hub id in ``MODEL=`` by a tiny local Llama with the zephyr
tokenizer. Everything else is the page's text.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_recipe

PAGE = tiny_recipe.REPO / "docs" / "quickstart.md"


def page_commands() -> list[str]:
    block = re.search(r"## The five commands\n\n```bash\n(.*?)```", PAGE.read_text(), re.S)
    assert block, "docs/quickstart.md lost its five-command block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_page_has_five_commands_that_name_real_keys():
    """The run command's overrides are all keys jaxalign accepts (checked without running anything)."""
    from jaxalign import config as config_lib

    commands = page_commands()
    assert len(commands) == 5 and commands[0].startswith("python3 -m venv .venv")
    run = next(c for c in commands if "jaxalign --config" in c).split()
    recipe = run[run.index("--config") + 1]
    overrides = [a.replace("$MODEL", "some/model").replace("my_pairs.jsonl", "x.jsonl") for a in run if "=" in a]
    cfg = config_lib.load(recipe, overrides)
    assert cfg.run.method == "dpo" and cfg.model.lora.rank == 16 and cfg.policy.batch_size == 2


@pytest.mark.slow
def test_quickstart_runs_as_written(shared_data, tmp_path):
    model = tiny_recipe.make_tiny_llama(tmp_path / "tiny")
    for f in (shared_data / tiny_recipe.TOKENIZER).iterdir():
        shutil.copy(f, model / f.name)
    bin_dir = Path(sys.executable).parent
    lines = page_commands()[1:]
    lines = [re.sub(r"^MODEL=\S+", f"MODEL={model}", line).replace(".venv/bin/", f"{bin_dir}/") for line in lines]
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=tiny_recipe.subprocess_env(devices=1),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    work = tmp_path / "runs" / "my_dpo"
    done = json.loads((work / "phases" / "r1_policy" / "done.json").read_text())
    assert done["metrics"]["pairs"] == 2 and done["metrics"]["steps"] == 1
    # the page's last command loaded the aligned model in transformers and printed its class and size
    assert re.search(r"^LlamaForCausalLM \d+$", proc.stdout, re.M), proc.stdout[-2000:]
    # the run's last lines named that folder and the adapter, as the page promises
    assert f"final model (r1/policy): {work / 'phases' / 'r1_policy' / 'model'}" in proc.stdout
    assert (work / "phases" / "r1_policy" / "adapter" / "adapter_config.json").is_file()
