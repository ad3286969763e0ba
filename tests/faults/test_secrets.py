"""Secrets: an API key comes only from the environment and reaches no artefact.

The OpenAI-compatible judge rates steered generations (the judge-agreement stage) against a real
HTTP server on 127.0.0.1 with a key set; the key must reach the server (so it was used) and must
appear in no file the stage wrote: the result JSON with its settings and provenance, and the
judge's on-disk response cache. The smoke grid test greps its executed notebooks, result files and
built HTML for a key planted in the environment the same way.
"""

from __future__ import annotations

import json

import yaml
from secrets_util import CANARY, files_containing  # tests/ (its conftest puts it on sys.path)
from test_judges_openai import FakeOpenAIServer

from saelib import stages
from saelib.profiles import PARAMS_DIR, profile_from_dict


def test_openai_judge_key_is_used_but_written_nowhere(tmp_path, monkeypatch):
    server = FakeOpenAIServer()
    try:
        monkeypatch.setenv("SAELIB_CANARY_KEY", CANARY)
        data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
        data["runs_dir"] = str(tmp_path / "runs")
        data["judge"] = {"cache_dir": str(tmp_path / "runs" / "judge-cache"),
                         "base_url": server.base_url, "api_key_env": "SAELIB_CANARY_KEY",
                         "max_retries": 1, "backoff_base_s": 0.01, "timeout_s": 5.0}
        data["judge_agreement"] = {"n_generations": 3, "n_latents": 0, "backend": "openai"}
        profile = profile_from_dict(data, name="smoke")
        job = stages.sae_jobs(profile)[0]
        rows = [{"latent": i, "concept": "cats", "instruction": "Write about pets.", "split": "heldout",
                 "instruction_index": i, "alpha": 1.0, "output": f"Cats and more cats {i}.",
                 "concept_rating": 2, "instruction_rating": 1, "fluency_rating": 2}
                for i in range(5)]
        out = stages.sae_dir(profile, job)
        out.mkdir(parents=True)
        (out / stages.steering.STEER_ROWS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / stages.layout.RESULT).write_text(json.dumps({"steering": {"g": 0.5, "concepts": []}}))

        record = stages.judge.run(profile, progress=False)
        assert record["n_generations"] == 3 and record["judge_b"] == "openai (gpt-4o-mini)"
        assert len(server.requests) == 9 and set(server.auth) == {f"Bearer {CANARY}"}
        assert record["settings"]["judge"]["api_key_env"] == "SAELIB_CANARY_KEY"
        assert list((tmp_path / "runs" / "judge-cache").rglob("*.json")), "the cache was written"
        assert files_containing(tmp_path, CANARY) == []
    finally:
        server.close()
