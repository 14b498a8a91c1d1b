"""Shared fixtures: tiny checkpoints built once per session, one local Ray cluster per session."""

from __future__ import annotations

import os

import pytest

from rayalign import toytask
from rayalign.tiny import build_tiny_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "gpt2", toytask.corpus()))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", toytask.corpus(),
                                     arch="llama"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (Ray Data, Serve and Train tests share it)."""
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
