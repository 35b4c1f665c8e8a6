"""Every shipped config parses, alone or composed with its stream config."""


import pytest
import yaml

from cl_lightning.cli import main
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
STREAMS = sorted(p for p in CONFIGS.glob("*.yaml"))
METHODS = [(CONFIGS / "synthetic.yaml", p) for p in sorted((CONFIGS / "methods").glob("*.yaml"))]
# every stream config configs/NAME.yaml with a folder configs/NAME/ of method configs
METHODS += [(stream, p) for stream in STREAMS if stream.with_suffix("").is_dir()
            for p in sorted(stream.with_suffix("").glob("*.yaml"))]


def print_config(capsys, *files):
    args = ["fit"]
    for f in files:
        args += ["-c", str(f)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def holds(got, wanted) -> bool:
    """``got`` has ``wanted``'s values; a nested block (e.g. ``dnc``) may add fields that
    the resolved config fills with their defaults."""
    if isinstance(wanted, dict):
        return isinstance(got, dict) and all(k in got and holds(got[k], v)
                                             for k, v in wanted.items())
    return got == wanted


@pytest.mark.parametrize("config", STREAMS, ids=lambda p: p.name)
def test_stream_config_parses(capsys, config):
    cfg = print_config(capsys, config)
    assert cfg["data"]["class_path"].startswith("datamodules.")
    assert "stream" not in cfg["model"]  # linked from the data, not user-set


@pytest.mark.parametrize("stream, method", METHODS, ids=lambda p: p.name)
def test_method_config_composes(capsys, stream, method):
    cfg = print_config(capsys, stream, method)
    method_cfg = yaml.safe_load(method.read_text())
    for wanted in method_cfg.get("trainer", {}).get("callbacks", []):
        got = [cb for cb in cfg["trainer"]["callbacks"]
               if cb["class_path"] == wanted["class_path"]]
        assert got and all(got[0]["init_args"][k] == v for k, v in wanted["init_args"].items())
    for key, value in method_cfg.get("model", {}).items():  # e.g. model.meta, model.context
        if isinstance(value, dict) and "init_args" in value:
            assert cfg["model"][key]["class_path"] == value["class_path"]
            assert holds(cfg["model"][key]["init_args"], value["init_args"])
        else:
            assert cfg["model"][key] == value
    for key, value in method_cfg.get("data", {}).get("init_args", {}).items():  # e.g. joint
        assert cfg["data"]["init_args"][key] == value


@pytest.mark.parametrize("stream, esmer, images", [("split_mnist", "esmer_fast_200", False),
                                                   ("permuted_mnist", "esmer_200", False),
                                                   ("rotated_mnist", "esmer_500", False),
                                                   ("split_cifar10", "esmer_200", True),
                                                   ("split_cifar100", "esmer_200", True),
                                                   ("split_tiny_imagenet", "esmer_200", True)])
def test_full_agent_composes_on_every_stream(capsys, stream, esmer, images):
    """stream + its ESMER config + agent (+ agent_cnn on colour images) + MAML + context: the
    agent's model and optimizer replace the backbone and SGD of the stream and ESMER configs;
    ESMER's buffer and the ESMER config's data options stay."""
    methods = CONFIGS / "methods"
    agent = [methods / "agent.yaml"] + ([methods / "agent_cnn.yaml"] if images else [])
    esmer_file = CONFIGS / stream / f"{esmer}.yaml"
    cfg = print_config(capsys, CONFIGS / f"{stream}.yaml", esmer_file, *agent,
                       methods / "maml.yaml", methods / "context.yaml")
    model = cfg["model"]
    assert model["net"]["class_path"] == "cl_lightning.models.agent.MemoryAgent"
    assert model["net"]["init_args"]["encoder"] == ("cnn" if images else "vector")
    assert model["net"]["init_args"]["dnc"] == {  # every DNCOptions field, the rest defaults
        "hidden_size": 64, "memory_slots": 32, "word_size": 32, "read_heads": 2,
        "write_heads": 1, "clip_value": 20.0, "masking": False, "dealloc": False,
        "sharpness": False, "compile_step": False, "temporal_links": True,
        "cuda_graphs": True, "cpp_kernels": "auto"}
    assert model["optimizer"]["class_path"] == "torch.optim.Adam"
    assert model["optimizer"]["init_args"]["lr"] == 0.001
    assert model["meta"]["init_args"]["steps"] == 5 and model["context"] is True
    esmer_cfg = yaml.safe_load(esmer_file.read_text())
    wanted = esmer_cfg["trainer"]["callbacks"][0]["init_args"]
    got = [cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"] == "callbacks.esmer.ESMER"]
    assert got and all(got[0]["init_args"][k] == v for k, v in wanted.items())
    data = {**yaml.safe_load((CONFIGS / f"{stream}.yaml").read_text())["data"]["init_args"],
            **esmer_cfg.get("data", {}).get("init_args", {})}
    assert all(cfg["data"]["init_args"][k] == v for k, v in data.items())
