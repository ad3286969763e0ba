"""Killing a streaming training job (SIGKILL) mid-stream and rerunning it: the rerun resumes from
the last checkpoint and ends with the same SAE bytes as an uninterrupted run.

The real packaged SmolLM2-135M-Instruct on the smoke profile's corpus, in streaming mode, with two
SAEs (TopK, whose knob is k, and ReLU, whose L1 coefficient is given: one round each) so that the
stream is the whole job; each training step is slowed in the child so the kill lands mid-stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUNNER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import yaml
    from saelib.profiles import PARAMS_DIR, profile_from_dict
    from saelib.sae import train as sae_train
    from saelib.stages import capture

    root, slow = Path(sys.argv[1]), float(sys.argv[2])
    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["runs_dir"] = str(root)
    data["grid"].update(architectures=["topk", "standard"], calibrate=False)
    data["training"]["mode"] = "streaming"
    profile = profile_from_dict(data, name="smoke")
    step = sae_train.SAERun.step

    def slow_step(self, batch):
        time.sleep(slow)
        return step(self, batch)

    sae_train.SAERun.step = slow_step
    capture.prepare(profile, progress=False)
    capture.run(profile, profile.models[0].name, progress=False)
''')


def _resumed_from(root: Path) -> dict[str, int | None]:
    """Each SAE's training step its last run resumed from (None: trained from the start), as its
    streaming record says."""
    return {p.parent.name: json.loads(p.read_text())["train"]["resumed_from_step"]
            for p in sorted(root.rglob("stream.json"))}


def _weights(root: Path) -> dict[str, str]:
    return {p.parent.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("sae/sae_weights.safetensors"))}


def test_a_killed_stream_resumes_to_the_same_sae_bytes(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, str(script), str(clean), "0"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    want = _weights(clean)
    assert len(want) == 2

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.02"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    # a checkpoint counts once its pointer is written (after the step folder is renamed into
    # place): killed between the two, the rerun rightly starts from scratch, and there would be
    # no resume to check
    while not any(killed.rglob("stream_checkpoints/*/latest.json")):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the stream ended before the planned kill")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert _weights(killed) == {}  # killed mid-stream: no SAE finished

    subprocess.run([sys.executable, str(script), str(killed), "0"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    assert _weights(killed) == want
    assert not any(killed.rglob("stream_checkpoints/*/step_*"))
    # it resumed from a checkpoint (a rerun from the start would give the same bytes too,
    # training being deterministic), where the uninterrupted run did not
    assert set(_resumed_from(clean).values()) == {None}
    # (the kill lands once one checkpoint exists; the other SAE's, written next, may not yet)
    resumed = _resumed_from(killed)
    assert len(resumed) == 2 and any(step is not None and step > 0 for step in resumed.values())
