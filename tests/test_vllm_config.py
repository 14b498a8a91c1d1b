"""vLLM sampler settings checked at config load, without vLLM (it is not installed in CI).

vLLM runs ``tensor_parallel_size`` shards, one per GPU, so a sampler actor needs that many
GPUs; actors sharing a GPU (fractional ``num_gpus``) each claim ``gpu_memory_utilization`` of
the card's memory, so that must not exceed their share. The KV cache is sized for the data's
prompt limit plus the new tokens, not the model's whole context.
"""

from __future__ import annotations

import pytest

from rayalign.config import ConfigError, SamplingConfig, build_config
from rayalign.config_ldalign import LDAlignConfig
from rayalign.config_services import SamplerServiceConfig
from rayalign.sampling import VLLM_ACTOR_ENV, vllm_max_model_len


def _ld(sampling: dict, sampler: dict) -> LDAlignConfig:
    """Training and evaluation sampling both run on the `pairs.sampler` actors."""
    return build_config(LDAlignConfig, {"sampling": sampling, "eval_sampling": sampling,
                                        "pairs": {"sampler": sampler}})


def test_tensor_parallel_needs_as_many_gpus_per_actor():
    with pytest.raises(ConfigError, match=r"pairs.sampler.num_gpus \(1.0\) must cover "
                                          r"sampling.tensor_parallel_size \(2\)"):
        _ld({"engine": "vllm", "tensor_parallel_size": 2}, {"num_gpus": 1})
    assert _ld({"engine": "vllm", "tensor_parallel_size": 2}, {"num_gpus": 2})


def test_fractional_gpu_caps_gpu_memory_utilization():
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization \(0.9\) exceeds "
                                          r"pairs.sampler.num_gpus \(0.5\)"):
        _ld({"engine": "auto"}, {"num_gpus": 0.5, "num_actors": 2})
    assert _ld({"engine": "auto", "gpu_memory_utilization": 0.45}, {"num_gpus": 0.5})


def test_vllm_without_gpus_is_refused_and_hf_or_cpu_auto_pass():
    with pytest.raises(ConfigError, match=r"pairs.sampler.num_gpus \(0.0\) must cover"):
        _ld({"engine": "vllm"}, {"num_gpus": 0})
    assert _ld({"engine": "auto"}, {"num_gpus": 0})  # HF generate on the CPU
    assert _ld({"engine": "hf", "tensor_parallel_size": 4}, {"num_gpus": 1})  # vLLM-only key


def test_sampler_service_replicas_are_checked():
    with pytest.raises(ConfigError, match=r"replicas.num_gpus \(1.0\) must cover"):
        build_config(SamplerServiceConfig, {"model_path": "m", "replicas": {"num_gpus": 1},
                                            "sampling": {"engine": "vllm",
                                                         "tensor_parallel_size": 2}})


def test_max_model_len_follows_the_data_limits():
    assert vllm_max_model_len(SamplingConfig(max_new_tokens=64), 128) == 192
    assert vllm_max_model_len(SamplingConfig(), None) is None


def test_actors_turn_off_vllm_v1_multiprocessing():
    assert VLLM_ACTOR_ENV == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
