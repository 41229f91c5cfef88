"""The serving configuration: each setting declared once (`config.setting`) is a flag of the repository builder, an
environment name, a parameter of the rendered models that reads back typed; no default is written twice."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from conftest import rendered_document, rendered_settings
from f5_triton.config import (DEFAULT_CACHES, DEFAULT_LIMITS, DEFAULT_SAMPLING, DEFAULT_SCHEDULER, DEFAULT_SERVER,
                              DEFAULT_STREAMING, SchedulerConfig, ServerConfig, ServingSettings, setting)
from f5_triton.cli import SERVE_FLAGS, build_parser
from f5_triton.client import default_url
from f5_triton.flags import flags_values
from f5_triton.model_paths import add_model_args, resolve_model_paths
from f5_triton.request import STREAMING_MODEL
from f5_triton.repository import (SECTIONS, RepositoryOptions, Section, add_repository_arguments,
                                          environment_arguments, options_from_args, options_type, render,
                                          repository_flags)

REPO = Path(__file__).resolve().parents[1]


def options_from(command_line: list[str], options: type = RepositoryOptions):
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    add_repository_arguments(parser, options)
    args = parser.parse_args(command_line)
    return options_from_args(args, *resolve_model_paths(args), options=options)


def test_a_setting_added_to_a_section_is_a_flag_an_environment_name_and_read_back_typed(tmp_path, tiny_ckpt):
    # the one edit: a field of the scheduler's section (here a subclass, and the settings that hold it)
    scheduler = dataclasses.make_dataclass("Scheduler", [("lookahead", int, setting(3, "chunks prepared ahead"))],
                                           bases=(SchedulerConfig,), frozen=True)
    settings = dataclasses.make_dataclass("Settings", [("scheduler", scheduler, dataclasses.field(default=scheduler()))],
                                          bases=(ServingSettings,), frozen=True)
    sections = tuple(dataclasses.replace(s, defaults=scheduler()) if s.defaults is DEFAULT_SCHEDULER else s
                     for s in SECTIONS)
    options = options_type(sections)
    flag = next(f for f in repository_flags(options) if f.part is None and f.option == "streaming_lookahead")
    assert (flag.name, flag.env, flag.kwargs["default"]) == ("--streaming-lookahead", "F5_REPO_STREAMING_LOOKAHEAD", 3)
    from_environment = environment_arguments({"F5_REPO_STREAMING_LOOKAHEAD": "7"}, options)
    assert from_environment == ["--streaming-lookahead", "7"]
    repo = render(options_from(["--target", "cpu", "--ckpt-dir", str(tiny_ckpt), *from_environment], options),
                  tmp_path / "repo")
    # the model's serving document, read back once at load into the typed sections
    read = rendered_settings(repo, STREAMING_MODEL, kind=settings)
    assert read.scheduler == scheduler(lookahead=7)  # typed, the section's other settings at their defaults
    assert json.loads(rendered_document(repo, STREAMING_MODEL))["scheduler"]["lookahead"] == 7
    assert "scheduler" not in json.loads(rendered_document(repo, "flow_matching"))  # only the section's models
    with pytest.raises(ValueError, match="scheduler has unknown fields"):  # a server without the field says so
        rendered_settings(repo, STREAMING_MODEL)


def test_every_option_is_a_flag_and_an_environment_name(tiny_ckpt):
    flags = repository_flags()
    # the checkpoint, vocabulary, Vocos and architecture come from model_paths' --ckpt-dir and friends
    assert {f.option for f in flags} == {f.name for f in dataclasses.fields(RepositoryOptions)} - {
        "ckpt", "vocab", "vocoder", "arch"}
    assert len({f.name for f in flags}) == len({f.env for f in flags}) == len(flags)
    environ = {"F5_REPO_FIRST_CHUNK_BYTES": "30", "F5_REPO_REFERENCE_CACHE_MB": "3.5", "F5_REPO_OUTPUT_CACHE_ENTRIES": "0",
               "F5_REPO_STREAM_PACING_ENABLED": "off", "F5_REPO_STREAM_PACING_QUEUE_SECONDS": "2",
               "F5_REPO_LIMIT_MAX_TEXT_BYTES": "1000", "F5_REPO_GPUS": "0,1", "F5_REPO_WARMUP": "no",
               "F5_REPO_NFE": "16", "F5_REPO_SWAY_SAMPLING_COEF": "-0.5", "F5_REPO_STREAMING_MAX_STREAMS": "4",
               "F5_REPO_UNSPLIT_AT_LOAD": "8",
               "F5_REPO_TARGET": "trt"}  # the target is the builder's own (run.sh --backend/--target)
    options = options_from(["--target", "cpu", "--ckpt-dir", str(tiny_ckpt), *environment_arguments(environ)])
    assert (options.first_chunk_bytes, options.reference_cache_mb, options.output_cache_entries) == (30, 3.5, 0)
    assert options.unsplit_at_load == 8
    assert options.streaming_pacing.enabled is False and options.streaming_pacing.queue_seconds == 2.0
    assert options.limits == {"max_text_bytes": 1000} and options.gpus == [0, 1] and options.warmup is False
    assert (options.target, options.nfe_steps, options.sway_sampling_coef, options.streaming_max_streams) == (
        "cpu", 16, -0.5, 4)
    with pytest.raises(ValueError, match="F5_REPO_FLOW_STANDBY must be true or false"):
        environment_arguments({"F5_REPO_FLOW_STANDBY": "maybe"})
    with pytest.raises(ValueError, match="F5_REPO_NFE must be an integer, got '1x'"):
        environment_arguments({"F5_REPO_NFE": "1x"})


def test_target_defaults_apply_only_where_unset(tiny_ckpt):
    paths = {"ckpt": tiny_ckpt / "model.safetensors", "vocab": tiny_ckpt / "vocab.txt", "vocoder": tiny_ckpt / "vocos"}
    cpu, gpu = RepositoryOptions("cpu", **paths), RepositoryOptions("gpu", **paths, dit_compile=False)
    assert (cpu.dtype, cpu.max_batch_size, cpu.warmup, cpu.dit_cuda_graphs) == ("fp32", 4, False, False)
    assert (gpu.dtype, gpu.max_batch_size, gpu.warmup, gpu.dit_cuda_graphs, gpu.dit_compile) == (
        "fp16", 8, True, True, False)


# --------------------------------------------------------------------------------------------- one default each

# Other names the tree gives these settings (a DiT engine's, a tool's flag).
ALIASES = {"nfe": "nfe_steps", "steps": "nfe_steps", "max_frames": "max_mel_frames", "graph_max_rows": "graph_max_rows",
           "graph_max_tokens": "graph_max_tokens", "graph_steps": "graph_steps"}
# Defaults that are another tool's own choice, not the server's (each says why).
DELIBERATE = {
    ("benchmark.py", "nfe"): "benchmarks measure 16 steps, the setting the README's numbers use",
    ("scripts/bench_vs_upstream.py", "nfe"): "compares with upstream at the benchmark's 16 steps",
    ("scripts/pacing_sim.py", "nfe"): "simulates the benchmark's 16 steps",
    ("benchmark.py", "max_streams"): "offline streaming benchmark: streams batched at once",
    ("f5_triton/engines/base.py", "graph_max_rows"): "an engine's own default, for in-process use (bench, tests)",
    ("f5_triton/engines/base.py", "graph_max_tokens"): "an engine's own default: packed graphs off in process",
    ("f5_triton/engines/base.py", "graph_steps"): "an engine's own default",
    ("f5_triton/gateway/app.py", "speed"): "the OpenAI speech API's published default",
    ("f5_triton/cli.py", "host"): "the gateway's own listen address, not Triton's",
    ("f5_triton/client.py", "host"): "the host a client reads the metrics of, not the address Triton listens on",
    ("f5_triton/supervisor/server.py", "ready_timeout"): "`with TritonServer(...)`'s own wait (tests, soak)",
}
SECTION_DEFAULTS = (DEFAULT_SAMPLING, DEFAULT_LIMITS, DEFAULT_STREAMING, DEFAULT_SCHEDULER, DEFAULT_CACHES,
                    DEFAULT_SERVER)
CONFIGURATION = {type(d).__name__ for d in SECTION_DEFAULTS}


def known_settings() -> set[str]:
    names = set(ALIASES)
    for defaults in SECTION_DEFAULTS:
        names |= {f.name for f in dataclasses.fields(defaults)}
    for flag in [*repository_flags(), *SERVE_FLAGS]:
        if isinstance(flag.kwargs.get("default"), (int, float, str)) and not isinstance(flag.kwargs["default"], bool):
            names |= {flag.dest, flag.option}
    return names


def literal_defaults(tree: ast.AST, definitions: set[str] = frozenset()):
    """(name, line) of every constant default given to a name: function parameters, class fields (but those of the
    classes named in `definitions`), argparse flags' `default=`."""
    skip = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name in definitions for n in c.body}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            yield from ((a.arg, d.lineno) for a, d in pairs if isinstance(d, ast.Constant) and d.value is not None)
        elif (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and id(node) not in skip
              and isinstance(node.value, ast.Constant) and node.value.value is not None):
            yield node.target.id, node.lineno
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args:
            flag = node.args[0].value if isinstance(node.args[0], ast.Constant) else ""
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if isinstance(default, ast.Constant) and default.value is not None and str(flag).startswith("--"):
                yield flag[2:].replace("-", "_"), node.lineno


def test_no_setting_default_is_written_twice():
    names = known_settings()
    files = [*REPO.glob("f5_triton/**/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("model_repo/*/1/model.py"),
             *REPO.glob("scripts/*.py"), *REPO.glob("*.py")]
    found = []
    for path in files:
        where = path.relative_to(REPO).as_posix()
        # the configuration's own classes (config.py) hold the one default of each
        definitions = CONFIGURATION if where == "f5_triton/config.py" else set()
        for name, line in literal_defaults(ast.parse(path.read_text()), definitions):
            if name in names and (where, name) not in DELIBERATE:
                found.append(f"{where}:{line}: {name}")
    assert not found, "defaults written beside the configuration (config.setting): " + ", ".join(found)


def test_the_stream_schedulers_own_defaults_are_the_configurations():
    import inspect

    from f5_triton.stream_scheduler import StreamScheduler

    signature = inspect.signature(StreamScheduler)
    assert {f.name: signature.parameters[f.name].default for f in dataclasses.fields(DEFAULT_SCHEDULER)} == \
        dataclasses.asdict(DEFAULT_SCHEDULER)


# --------------------------------------------------------------------------------------------- f5-triton serve

SERVE_ENVIRONMENT = [flag.env for flag in SERVE_FLAGS if flag.env]


def serve_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def test_serve_has_the_server_configurations_flags_with_the_defaults_it_had(monkeypatch):
    for name in SERVE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert SERVE_ENVIRONMENT == ["F5_TRITON_HOST", "HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "READY_TIMEOUT"]
    options = [a.option_strings[0] for a in serve_parser()._actions]
    # the flags and defaults `f5-triton serve` had before they were generated from config.ServerConfig
    assert sorted(options) == sorted(["-h", "--model-repo", "--host", "--http-port", "--grpc-port", "--metrics-port",
                                      "--log-verbose", "--log-file", "--ready-timeout", "--pid-file", "--detach"])
    args = build_parser().parse_args(["serve", "--model-repo", "repo"])
    assert {k: v for k, v in vars(args).items() if k != "func"} == {
        "command": "serve", "model_repo": "repo", "host": "127.0.0.1", "http_port": 8000, "grpc_port": 8001,
        "metrics_port": 8002, "log_verbose": 0, "log_file": None, "ready_timeout": 600.0, "pid_file": None,
        "detach": None}
    assert ServerConfig(**flags_values(SERVE_FLAGS, args)) == DEFAULT_SERVER
    assert default_url("http") == "localhost:8000" and default_url("grpc") == "localhost:8001"


def test_an_environment_name_sets_a_serve_flag_and_the_command_line_wins(monkeypatch, capsys):
    monkeypatch.setenv("HTTP_PORT", "18000")
    monkeypatch.setenv("F5_TRITON_HOST", "0.0.0.0")
    monkeypatch.setenv("READY_TIMEOUT", "30")
    monkeypatch.delenv("GRPC_PORT", raising=False)
    args = build_parser().parse_args(["serve", "--model-repo", "repo"])
    assert (args.http_port, args.host, args.ready_timeout, args.grpc_port) == (18000, "0.0.0.0", 30.0, 8001)
    assert build_parser().parse_args(["serve", "--model-repo", "repo", "--http-port", "9000"]).http_port == 9000
    assert default_url("http") == "localhost:18000"  # the clients' default follows the same name
    assert "(HTTP_PORT sets it too) (default: 18000)" in " ".join(serve_parser().format_help().split())

    monkeypatch.setenv("HTTP_PORT", "80a0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model-repo", "repo"])
    assert "argument --http-port: HTTP_PORT must be an integer, got '80a0'" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--model-repo", "repo", "--http-port", "1"]).http_port == 1
    assert build_parser().parse_args(["status", "--pid-file", "p"]).pid_file == "p"  # other commands are not hurt
    with pytest.raises(ValueError, match="HTTP_PORT must be an integer, got '80a0'"):
        default_url("http")


def test_a_detached_serve_gets_the_same_settings():
    """`serve --detach` starts `serve` again with its settings as flags (each flag's `arguments`)."""
    config = ServerConfig(host="::", http_port=1, grpc_port=2, metrics_port=3, log_verbose=2, ready_timeout_seconds=2.5)
    argv = [arg for flag in SERVE_FLAGS for arg in flag.arguments(getattr(config, flag.option))]
    args = build_parser().parse_args(["serve", "--model-repo", "repo", *argv])
    assert ServerConfig(**flags_values(SERVE_FLAGS, args)) == config


def test_shell_and_container_files_default_to_the_server_configuration():
    """run.sh, the GPU scripts, compose, the image and the K8s manifests write the ports and host in their own
    languages; each literal is ServerConfig's default (the image's F5_TRITON_HOST=0.0.0.0 is a container's own)."""
    defaults = {flag.env: flag.kwargs["default"] for flag in SERVE_FLAGS if flag.env}
    files = [REPO / "run.sh", REPO / "docker-compose.yml", *sorted((REPO / "scripts").glob("*.sh"))]
    found = {}
    for path in files:
        for name, value in re.findall(r"\$\{(\w+):-([^}]*)\}", path.read_text()):
            if name in defaults:
                found.setdefault(name, set()).add((path.name, type(defaults[name])(value)))
    assert {name: {value for _, value in places} for name, places in found.items()} == {
        name: {default} for name, default in defaults.items()}
    assert {path for places in found.values() for path, _ in places} >= {"run.sh", "docker-compose.yml"}

    ports = {name: default for name, default in defaults.items() if name.endswith("_PORT")}
    image = (REPO / "Dockerfile.server").read_text()
    assert {name: int(value) for name, value in re.findall(r"\b(\w+_PORT)=(\d+)", image) if name in ports} == ports
    assert {int(p) for p in re.search(r"^EXPOSE (.*)$", image, re.M)[1].split()} >= set(ports.values())
    compose = (REPO / "docker-compose.yml").read_text()
    assert {name: int(inside) for name, inside in re.findall(r"\$\{(\w+_PORT):-\d+\}:(\d+)", compose)
            if name in ports} == ports  # the container's side: the image's ports
