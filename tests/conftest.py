"""Shared fixtures: tiny checkpoints built once per session, one local Ray cluster per session."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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

    # accel: one unit of a custom resource standing in for a node's single GPU
    ray.init(address="local", num_cpus=6, resources={"accel": 1}, include_dashboard=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


TINY_BERT_WORDS = ("the cat sat on mat is a dog ran hello world ok no yes good bad answer "
                   "question what time it").split()


def _tiny_bert(out_dir, head: bool, seed: int) -> str:
    """A 2-layer BERT with a WordPiece tokenizer over TINY_BERT_WORDS, built locally: an
    encoder (`head=False`) or a one-output sequence classifier, the shape of a reward model."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    out_dir.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_BERT_WORDS]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, model_max_length=512)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=512,
                        num_labels=1, initializer_range=0.3)  # spread-out outputs
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if head else BertModel)(config).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_bert_encoder(tmp_path_factory) -> str:
    return _tiny_bert(tmp_path_factory.mktemp("ckpt") / "bert", head=False, seed=0)


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory) -> str:
    return _tiny_bert(tmp_path_factory.mktemp("ckpt") / "bert_rm", head=True, seed=1)


@pytest.fixture(scope="module")
def gloo_rank():
    """A gloo process group of size 1 for one test module, as torchrun would set it up.

    DeepSpeed caches a clone of the world group (``deepspeed.utils.groups._WORLD_GROUP``) for
    the process's life; after this module destroys its group the clone is dead, and the next
    module's ZeRO >= 1 engine would use it. Teardown drops the cached clone with the group.
    """
    import torch.distributed as dist

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


def processes_with_env(entry: str, needle: bytes = b"") -> list[int]:
    """PIDs whose environment holds ``entry`` (``KEY=value``) and whose command line contains
    `needle`: a test's own processes, found by a private value it set, never by name."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit()
                    and entry.encode() in (proc / "environ").read_bytes().split(b"\0")
                    and needle in (proc / "cmdline").read_bytes()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def kill_processes_with_env(entry: str) -> None:
    """SIGKILL every process `processes_with_env(entry)` finds (a test's leftovers)."""
    for pid in processes_with_env(entry):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_process_group(proc, grace_s: float) -> None:
    """SIGTERM the process group a test started (never `ray stop`), SIGKILL it after grace_s."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def read_manifest(run_dir: Path) -> dict:
    """A run directory's manifest as it is now; {} while it is missing or being replaced."""
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def free_port() -> int:
    """A TCP port free on loopback now (a torch.distributed master, a Ray head, a dashboard)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable[..., None], world: int, *args: object) -> None:
    """Run ``worker(rank, *args)`` in `world` spawned processes (``mp.spawn``, joined), each
    waiting on the others before it exits.

    Without the wait, a rank that has destroyed its gloo group and exits while a peer is still
    tearing down its own can abort the peer ("terminate called without an active exception",
    SIGABRT after the test's work has passed): 1 run in 5-15 of the two-rank AOT test on this
    machine, 0 in 80 with it.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    exit_barrier = multiprocessing.get_context("spawn").Barrier(world)
    mp.spawn(_rank_then_wait, args=(worker, exit_barrier, args), nprocs=world, join=True)


def _rank_then_wait(rank: int, worker: Callable[..., None], exit_barrier, args: tuple) -> None:
    worker(rank, *args)
    exit_barrier.wait(timeout=120)  # a rank that failed never gets here; spawn reports it


@contextmanager
def gloo_group(rank: int, port: int, world: int, backend: str = "gloo") -> Iterator[None]:
    """One rank (an ``mp.spawn`` worker) of a loopback process group, set up as torchrun
    would (the env vars DeepSpeed reads), one CPU thread a rank; destroyed on the way out."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
