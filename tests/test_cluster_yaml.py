"""cluster.yaml passes Ray's own autoscaler config validation (the schema `ray up` applies)."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_valid_and_gpu_workers_scale_from_zero():
    config = prepare_config(load())
    validate_config(config)
    workers = {k: v for k, v in config["available_node_types"].items()
               if k != config["head_node_type"]}
    assert workers and all(v["min_workers"] == 0 for v in workers.values())
    assert any("rayalign" in cmd for cmd in config["setup_commands"])


def test_validation_rejects_a_broken_config():
    broken = load()
    broken["available_node_types"]["gpu_1x"]["min_wokers"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_a_failed_nfs_mount_stops_the_node_setup():
    """run_dir on local disk by accident would split a run across nodes: no `|| true`, and
    the mount is checked after it is made."""
    (mount,) = [c for c in load()["initialization_commands"] if "mount -t nfs4" in c]
    assert "|| true" not in mount and mount.count("mountpoint -q /mnt/shared") == 2
    assert "exit 1" in mount
