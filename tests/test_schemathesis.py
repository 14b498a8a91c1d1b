"""schemathesis against both services' OpenAPI documents: every check, >= 100 examples per
operation, with the bearer token; 0 server errors and 0 schema violations.

tests/schemathesis.toml only names the statuses that count as a rejection (413, our "over a
configured limit") or an acceptance (400 for the one cross-field limit, prompts x n) where
schemathesis' defaults do not know them; no check is turned off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ray import serve

from rayalign.config import ResourcesConfig, SamplingConfig
from rayalign.config_ldalign import GuideConfig
from rayalign.config_services import HTTPServiceConfig, SamplerServiceConfig, ScoringConfig
from rayalign.guide import GuideModel
from services import sampler, scoring

ST = str(Path(sys.executable).parent / "st")
CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
TOKEN = "schemathesis-token"
HTTP = HTTPServiceConfig(auth_token=TOKEN)


@pytest.fixture(scope="module")
def services(ray_cluster, tiny_gpt2, tmp_path_factory):
    guide = GuideModel.create(GuideConfig(), tiny_gpt2, 32, 64).save(
        tmp_path_factory.mktemp("st") / "guide")
    apps = {
        "/st-sampler": sampler.build_app(SamplerServiceConfig(
            model_path=tiny_gpt2, served_model_name="tiny", http=HTTP, max_completions=8,
            sampling=SamplingConfig(max_new_tokens=8), max_prompt_length=32)),
        "/st-scoring": scoring.build_app(ScoringConfig(
            guide_path=str(guide), http=HTTP, replicas=ResourcesConfig(num_cpus=1),
            max_items=4, max_candidates=4, max_text_chars=256)),
    }
    for prefix, app in apps.items():
        serve.run(app, name=prefix[1:], route_prefix=prefix)
    yield list(apps)
    for prefix in apps:
        serve.delete(prefix[1:])


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["/st-sampler", "/st-scoring"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(services, prefix, tmp_path):
    base = f"http://127.0.0.1:8000{prefix}"
    out = subprocess.run(
        [ST, "--config-file", str(CONFIG), "run", f"{base}/openapi.json", "--url", base,
         "--checks", "all", "--max-examples", "100", "--seed", "1", "--no-color",
         "-H", f"Authorization: Bearer {TOKEN}"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # st caches in its cwd
    summary = out.stdout[out.stdout.rfind("SUMMARY"):]
    print(summary)
    assert out.returncode == 0, out.stdout[-6000:]
    assert "Tested: 3" in summary and "failures" not in summary.lower()
