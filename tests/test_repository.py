"""Rendering the model repository for each target; configs parse as Triton ModelConfig protos."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from f5_triton.serving.repository import STEP_MODELS, RepositoryOptions, render
from f5_triton.serving.schema import INPUTS

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def plans(tmp_path):
    dit, vocoder = tmp_path / "dit_step.plan", tmp_path / "vocoder.plan"
    dit.write_bytes(b"not a real plan")
    vocoder.write_bytes(b"not a real plan")
    return dit, vocoder


@pytest.mark.parametrize("target", ["cpu", "gpu", "trt"])
def test_script_renders_every_target(tmp_path, tiny_ckpt, plans, target):
    out = tmp_path / "repo"
    args = [sys.executable, str(REPO_ROOT / "scripts" / "build_model_repo.py"), "--target", target,
            "--ckpt-dir", str(tiny_ckpt), "--output", str(out), "--nfe", "16", "--max-batch-size", "4",
            "--queue-delay-us", "1234"]
    if target == "trt":
        args += ["--dit-engine-path", str(plans[0]), "--vocoder-plan", str(plans[1])]
    subprocess.run(args, check=True, capture_output=True)
    configs = {name: parse(out / name / "config.pbtxt") for name in STEP_MODELS}
    ensemble = configs["f5_tts"]
    assert ensemble.platform == "ensemble"
    assert [i.name for i in ensemble.input] == [f.name for f in INPUTS]
    assert [o.name for o in ensemble.output] == ["waveform"]
    flow = configs["flow_matching"]
    assert flow.max_batch_size == 4
    assert flow.dynamic_batching.max_queue_delay_microseconds == 1234
    assert all(i.allow_ragged_batch for i in flow.input if -1 in i.dims)
    params = {k: v.string_value for k, v in flow.parameters.items()}
    assert Path(params["ckpt"]).is_file() and Path(params["vocab"]).is_file()
    assert params["dit_engine"] == ("tensorrt" if target == "trt" else "torch")
    assert configs["preprocess"].parameters["nfe_steps"].string_value == "16"
    kind = model_config_pb2.ModelInstanceGroup.KIND_CPU if target == "cpu" else model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert flow.instance_group[0].kind == kind
    vocoder = configs["vocoder"]
    if target == "trt":
        assert vocoder.backend == "tensorrt" and (out / "vocoder" / "1" / "model.plan").is_file()
    else:
        assert vocoder.backend == "python" and (out / "vocoder" / "1" / "model.py").is_file()


def test_gpus_place_instances(tmp_path, tiny_ckpt):
    out = render(RepositoryOptions(target="gpu", ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                                   vocoder=tiny_ckpt / "vocos", gpus=[0, 1], flow_instances_per_device=2),
                 tmp_path / "repo")
    group = parse(out / "flow_matching" / "config.pbtxt").instance_group[0]
    assert list(group.gpus) == [0, 1] and group.count == 2


def test_trt_target_needs_engines(tiny_ckpt):
    with pytest.raises(ValueError, match="--vocoder-plan"):
        RepositoryOptions(target="trt", ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                          vocoder=tiny_ckpt / "vocos")


@pytest.mark.server
def test_trt_repository_passes_tritonserver_config_parsing(tmp_path, tiny_ckpt, plans):
    """The bundled server has no TensorRT backend: every model must load or fail only for that reason."""
    from f5_triton.serving.launcher import TritonServer, free_port

    repo = render(RepositoryOptions(target="trt", ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                                    vocoder=tiny_ckpt / "vocos", dit_engine_path=plans[0], vocoder_plan=plans[1],
                                    preprocess_instances=1, postprocess_instances=1), tmp_path / "repo")
    # the python models run on the CPU here: turn the GPU instance groups into CPU ones
    for name in ("flow_matching",):
        path = repo / name / "config.pbtxt"
        path.write_text(path.read_text().replace("kind: KIND_GPU gpus: [ 0 ]", "kind: KIND_CPU"))
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          extra_args=["--exit-on-error=false", "--strict-readiness=false"])
    with server:
        server.wait_ready(240)
        request = urllib.request.Request(f"{server.urls.http}/v2/repository/index", data=b"{}", method="POST",
                                         headers=server.admin_headers)
        index = {m["name"]: m for m in json.load(urllib.request.urlopen(request))}
        log = Path(server.log_path).read_text()
    for name in ("f5_tts", "preprocess", "flow_matching", "postprocess"):
        assert index[name]["state"] == "READY", index[name]
    assert index["vocoder"]["state"] == "UNAVAILABLE"
    assert "tensorrt" in index["vocoder"]["reason"].lower()
    assert "falling back" in log.lower() or "fallback" in log.lower()  # the DiT plan is not a plan: loud warning
