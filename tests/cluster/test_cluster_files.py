"""The cluster files, validated offline: KubeRay manifests against the CRD schemas, the launcher YAML
against the schema inside the ray wheel, the Dockerfile against scripts/install.sh."""

import copy
import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parents[1] / "data" / "kuberay"
MANIFESTS = sorted(p for p in (ROOT / "cluster").rglob("*.yaml") if yaml.safe_load(p.read_text()).get("kind") in ("RayCluster", "RayJob"))


def strict(node):
    """The CRD's openAPIV3Schema as JSON Schema, as `kubectl apply --validate=strict` reads it: unknown fields
    are errors (unless the schema preserves them) and int-or-string means either."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def crd_schema(kind: str) -> dict:
    name = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}[kind]
    with gzip.open(DATA / f"{name}.v1.schema.json.gz") as f:
        return strict(json.load(f))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_is_a_raycluster_and_a_rayjob_per_program():
    kinds = sorted((load(p)["kind"], p.name) for p in MANIFESTS)
    assert kinds == [("RayCluster", "raycluster.yaml"), ("RayJob", "rayjob-build-trainset.yaml"),
                     ("RayJob", "rayjob-train.yaml"), ("RayJob", "rayjob-upscale.yaml")]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_matches_the_crd_schema(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, crd_schema(doc["kind"]))
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head["num-gpus"] == "0" and head["num-cpus"] == "0", "no work scheduled on the head"
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1


def test_the_schema_check_catches_a_typo():
    doc = load(ROOT / "cluster/kuberay/raycluster.yaml")
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = 0  # missing "s"
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        jsonschema.validate(bad, crd_schema("RayCluster"))
    bad = copy.deepcopy(doc)
    bad["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema("RayCluster"))


@pytest.mark.parametrize("program", ["upscale", "build-trainset", "train"])
def test_rayjobs_run_one_program_on_the_raycluster_spec(program):
    import typer

    from pipelines.cli import app
    from pipelines.cli.jobs import ClickException

    job = load(ROOT / f"cluster/kuberay/rayjob-{program}.yaml")["spec"]
    assert job["rayClusterSpec"] == load(ROOT / "cluster/kuberay/raycluster.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["activeDeadlineSeconds"] > 0
    assert job["submitterConfig"]["backoffLimit"] >= 1 and job["backoffLimit"] >= 0
    assert job["entrypointNumGpus"] == 0, "the driver asks for no GPU"
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipelines.cli", program]
    commands = typer.main.get_command(app).commands
    if program in commands:  # `train` lands with its own issue; its template is checked once it exists
        commands[program].make_context(program, argv[4:])
    else:
        with pytest.raises(KeyError):
            commands[program]
    with pytest.raises(ClickException, match="dst"):
        commands["upscale"].make_context("upscale", ["s3://a"])  # the parse check is a real one


def test_launcher_yaml_matches_the_schema_in_the_ray_wheel():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = load(ROOT / "cluster/launcher/aws.yaml")
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu"]["min_workers"] == 0 and types["gpu"]["max_workers"] >= 1
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def pip_installs(text: str) -> list[str]:
    """The package specs and flags of every `pip install` line, normalised (quiet/no-cache flags dropped)."""
    out = []
    for line in text.splitlines():
        if "pip install" not in line or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line.split("RUN", 1)[-1])
        env = [w for w in words if re.match(r"^[A-Z0-9_]+=", w)]
        rest = words[words.index("install") + 1:]
        out.append(" ".join(env + [w for w in rest if w not in ("--quiet", "--no-cache-dir")]))
    return out


def test_dockerfile_is_the_pinned_ray_gpu_image_installing_like_install_sh():
    import ray

    docker = (ROOT / "cluster/Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", docker, re.M)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", base), base
    ours, script = pip_installs(docker), pip_installs((ROOT / "scripts/install.sh").read_text())
    assert ours[:2] == script[:2], "torch first, then sam2 built against it, same pins and flags"
    assert script[2] == '-e .[test]' and ours[2] == ".[train-gpu,mlflow]", \
        "then this package (in the image: not editable, no test extra, the 8-bit AdamW of train-gpu, MLflow's client)"


def test_launcher_nodes_allow_imdsv2_only_with_one_hop():
    cfg = load(ROOT / "cluster/launcher/aws.yaml")
    for name, node in cfg["available_node_types"].items():
        meta = node["node_config"].get("MetadataOptions")
        assert meta == {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"}, name


def _egress_allows(policy: dict, ip: str, port: int) -> bool:
    """Whether a NetworkPolicy's egress rules let a pod reach ip:port outside the cluster (ipBlock rules)."""
    import ipaddress

    addr = ipaddress.ip_address(ip)
    for rule in policy["spec"]["egress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        for peer in rule.get("to", []):
            block = peer.get("ipBlock")
            if block and addr in ipaddress.ip_network(block["cidr"]) and \
                    not any(addr in ipaddress.ip_network(e) for e in block.get("except", [])):
                return True
    return False


def test_the_egress_policy_keeps_ray_pods_off_metadata_and_private_networks():
    policy = load(ROOT / "cluster/kuberay/networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Egress"]
    # it selects the pods KubeRay labels (every Ray pod carries ray.io/node-type)
    assert {"key": "ray.io/node-type", "operator": "Exists"} in policy["spec"]["podSelector"]["matchExpressions"]
    assert _egress_allows(policy, "52.216.1.1", 443), "S3 over HTTPS"
    for ip in ("169.254.169.254", "10.0.0.5", "172.20.0.1", "192.168.1.1", "127.0.0.1", "100.64.0.1"):
        assert not _egress_allows(policy, ip, 443) and not _egress_allows(policy, ip, 80), ip
    assert not _egress_allows(policy, "52.216.1.1", 80), "plain HTTP is not needed"


@pytest.mark.parametrize("program", ["upscale", "build-trainset", "train"])
def test_every_shipped_rayjob_entrypoint_passes_its_real_cli_check(program, s3, s3_endpoint, monkeypatch):
    """Not a parse only: the program's own checks run (--weights needs --preset, the weights exist, the
    settings validate) up to --print-config, with YOUR_BUCKET as a bucket on the local S3."""
    from typer.testing import CliRunner

    from pipelines.cli.app import app

    s3.create_bucket(Bucket="your-bucket")
    for key in ("weights/stable-diffusion-2-base/model_index.json", "weights/checkpoint-90000/unet/config.json",
                "weights/sam2.1_hiera_tiny.pt", "weights/ram_swin_large_14m.pth", "weights/DAPE.pth"):
        s3.put_object(Bucket="your-bucket", Key=key, Body=b"{}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    job = load(ROOT / f"cluster/kuberay/rayjob-{program}.yaml")["spec"]
    argv = shlex.split(job["entrypoint"].replace("YOUR_BUCKET", "your-bucket"))
    assert argv[:4] == ["python", "-m", "pipelines.cli", program]
    result = CliRunner().invoke(app, [*argv[3:], "--print-config"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    if program != "build-trainset":  # (build-trainset needs no model: the tagger is optional)
        assert printed["model"]["name"] != "tiny", "a shipped job runs the released model"
    if program == "train":
        assert printed["workers"] == 8, "one worker per GPU of the 8-GPU worker group"


@pytest.mark.parametrize("program", ["upscale", "build-trainset", "train"])
def test_every_example_config_is_accepted_by_its_program(program, tmp_path):
    """examples/<program>.yaml through the real CLI up to --print-config: every key is a known setting."""
    from typer.testing import CliRunner

    from pipelines.cli.app import app

    args = {"upscale": [str(tmp_path / "in"), str(tmp_path / "out")],
            "build-trainset": [str(tmp_path / "hr"), str(tmp_path / "ts")],
            "train": [str(tmp_path / "ts"), str(tmp_path / "run")]}[program]
    result = CliRunner().invoke(app, [program, *args, "--config", str(ROOT / "examples" / f"{program}.yaml"),
                                      "--print-config"])
    assert result.exit_code == 0, result.output
    example = load(ROOT / "examples" / f"{program}.yaml")
    printed = yaml.safe_load(result.output)
    for key, value in example.items():  # what the example sets is what the job runs with
        if not isinstance(value, dict):
            assert printed[key] == value, key
