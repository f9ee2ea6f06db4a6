"""cluster.yaml: valid for Ray's own cluster launcher, and private by construction.

Offline: Ray's schema validation and the AWS provider's security-group rule builder run without
AWS; nothing here launches or contacts anything.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parent.parent
PRIVATE_PORTS = {8265: "dashboard/job API", 10001: "Ray client", 6379: "GCS"}
WORLD = {"0.0.0.0/0", "::/0"}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def _commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key) or [])


def test_valid_for_ray_cluster_launcher(prepared):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)  # Ray's ray-schema.json plus its own cross-field checks
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert types["head"]["resources"] == {"CPU": 0}  # no tasks on the head
    gpu = [t for t in types.values() if re.match(r"(g5|g6|p4d|p5)\.", t["node_config"]["InstanceType"])]
    cpu = [t for n, t in types.items() if n != "head" and t not in gpu]
    assert gpu and cpu
    for t in gpu + cpu:  # autoscaling: from zero up to a bound
        assert t["min_workers"] == 0 < t["max_workers"]
    assert sum(t["max_workers"] for t in gpu + cpu) <= prepared["max_workers"]


def test_schema_validation_is_strict(prepared):
    """The check above can fail: Ray's schema rejects unknown keys and bad node types."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(prepared)
    bad["dashboard_port"] = 8265
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(prepared)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_config(bad)


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return lo == -1 or lo <= port <= hi


def test_ray_ports_not_open_to_the_world(prepared):
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    for name, t in prepared["available_node_types"].items():
        # With no SecurityGroupIds the launcher manages the group, so its rules are known here.
        assert "SecurityGroupIds" not in t["node_config"], name
    extra = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    # Exactly the rules the AWS provider will authorize on the group it creates.
    rules = _create_default_inbound_rules({"sg-cluster"}, extra)
    world = [r for r in rules
             if {x.get("CidrIp") for x in r.get("IpRanges", [])} & WORLD
             or {x.get("CidrIpv6") for x in r.get("Ipv6Ranges", [])} & WORLD]
    for r in world:
        for port, what in PRIVATE_PORTS.items():
            assert not _covers(r, port), f"{what} port {port} open to the world by {r}"
    # The rule builder is really looked at: the launcher's own SSH rule is world-open.
    assert any(_covers(r, 22) for r in world)
    assert not any(_covers(r, 8265) for r in world)


def test_dashboard_local_only_and_token_auth_everywhere(prepared, raw):
    head = _commands(prepared, "head_start_ray_commands")
    worker = _commands(prepared, "worker_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmds in (head, worker):
        starts = [ln for ln in cmds.splitlines() if "ray start" in ln]
        assert starts and all("RAY_AUTH_MODE=token" in ln for ln in starts)
    # The token travels as a file, never as a value in this file.
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", text)
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id", text, re.I)
    for name, t in prepared["available_node_types"].items():
        nc = t["node_config"]
        assert nc["MetadataOptions"]["HttpTokens"] == "required", name
        assert all(b["Ebs"]["Encrypted"] for b in nc["BlockDeviceMappings"]), name


def test_installs_this_project_with_pinned_ray_and_cuda_torch(prepared):
    import ray
    from packaging.requirements import Requirement

    setup = _commands(prepared, "setup_commands")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = {Requirement(d).name: Requirement(d) for d in pyproject["project"]["dependencies"]}

    pins = re.findall(r"ray\[([a-z,]+)\]==(\d+\.\d+\.\d+)", setup)
    assert len(pins) == 1, pins
    extras, version = pins[0]
    assert {"default", "train", "data"} <= set(extras.split(","))
    assert version.split(".")[:2] == ray.__version__.split(".")[:2]
    assert deps["ray"].specifier.contains(version)

    torch_req = re.search(r'pip install -q "(torch[^"]*)"', setup)
    assert torch_req and "index-url" not in setup  # PyPI's Linux wheel is the CUDA build
    assert Requirement(torch_req.group(1)).specifier == deps["torch"].specifier

    assert prepared["file_mounts"].get("~/t2i") == "."
    assert re.search(r"pip install .*~/t2i\b", setup)
    assert ".venv" in prepared["rsync_exclude"]  # a local venv is never shipped to the nodes
    # The head's setup runs the common setup first (merged by prepare_config).
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]
