import textwrap

import pytest
from omegaconf import OmegaConf

from mmf_plugins.common.config import ConfigError, build_config, load_yaml, parse_opts, save_config

PLUGIN = '''
from mmf_plugins.common.registry import registry
from mmf_plugins.datasets.base_dataset_builder import BaseDatasetBuilder
from mmf_plugins.models.base_model import BaseModel
import os
HERE = os.path.dirname(__file__)

@registry.register_model("layers_model")
class LayersModel(BaseModel):
    @classmethod
    def config_path(cls):
        return os.path.join(HERE, "model.yaml")

@registry.register_builder("layers_ds")
class LayersBuilder(BaseDatasetBuilder):
    @classmethod
    def config_path(cls):
        return os.path.join(HERE, "dataset.yaml")
'''


@pytest.fixture(scope="module")
def layers_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("plug") / "layers_plugin"
    root.mkdir()
    (root / "__init__.py").write_text(PLUGIN)
    # each layer sets a key of its own and overrides one set by the layer before
    (root / "model.yaml").write_text(textwrap.dedent("""
        model_config: {layers_model: {hidden: 8}}
        training: {log_interval: 1, evaluation_interval: 11}
    """))
    (root / "dataset.yaml").write_text(textwrap.dedent("""
        dataset_config: {layers_ds: {num: 3}}
        training: {log_interval: 2, checkpoint_interval: 22}
    """))
    return root


def _user_file(tmp_path, body):
    p = tmp_path / "user.yaml"
    p.write_text(textwrap.dedent(body))
    return p


def test_merge_order_each_layer_overrides_the_one_before(layers_plugin, tmp_path):
    user = _user_file(tmp_path, "training: {log_interval: 3, max_updates: 33}\n")
    base = [f"config={user}", "model=layers_model", "datasets=layers_ds", f"env.user_dir={layers_plugin}"]
    cfg = build_config(base)
    assert cfg.training.log_interval == 3  # user file > dataset > model > defaults (100)
    assert cfg.training.evaluation_interval == 11  # model layer over defaults
    assert cfg.training.checkpoint_interval == 22  # dataset layer over defaults
    assert cfg.training.max_updates == 33
    assert cfg.model_config.layers_model.hidden == 8 and cfg.dataset_config.layers_ds.num == 3
    cfg = build_config(base + ["training.log_interval=4"])
    assert cfg.training.log_interval == 4  # command line wins
    cfg = build_config([o for o in base if not o.startswith("config=")])
    assert cfg.training.log_interval == 2  # without the user file, the dataset layer wins over the model


def test_overrides_parse_values_like_mmf(layers_plugin):
    base = ["model=layers_model", "datasets=layers_ds", f"env.user_dir={layers_plugin}"]
    cfg = build_config(base + ["training.clip_norm=0.5", "training.tensorboard=True", "training.max_epochs=None",
                               "evaluation.metrics=['accuracy']", "checkpoint.pretrained_state_mapping.bert=bert"])
    assert cfg.training.clip_norm == 0.5 and cfg.training.tensorboard is True and cfg.training.max_epochs is None
    assert cfg.checkpoint.pretrained_state_mapping.bert == "bert"  # keys may be added inside empty mappings
    assert list(cfg.evaluation.metrics) == ["accuracy"]
    # alternating "key value" grammar
    special, overrides = parse_opts(["model", "soho", "dataset", "vqa2", "training.max_updates", "5"])
    assert special == {"model": "soho", "datasets": "vqa2"} and overrides == ["training.max_updates=5"]


def test_unknown_override_suggests_closest(layers_plugin):
    with pytest.raises(ConfigError, match="did you mean 'training.max_updates'"):
        build_config(["model=layers_model", "datasets=layers_ds", f"env.user_dir={layers_plugin}",
                      "training.max_update=5"])


def test_missing_model_and_unknown_names(layers_plugin):
    with pytest.raises(ConfigError, match="Required argument 'model'"):
        build_config(["datasets=layers_ds", f"env.user_dir={layers_plugin}"])
    with pytest.raises(ConfigError, match="Did you mean 'layers_model'"):
        build_config(["model=layers_modl", "datasets=layers_ds", f"env.user_dir={layers_plugin}"])
    with pytest.raises(ConfigError, match="unknown dataset builder 'layers_dss'"):
        build_config(["model=layers_model", "datasets=layers_dss", f"env.user_dir={layers_plugin}"])
    with pytest.raises(ConfigError, match="not found"):
        build_config(["config=does/not/exist.yaml", "model=layers_model", "datasets=layers_ds",
                      f"env.user_dir={layers_plugin}"])


def test_includes_recursive_relative_and_later_wins(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("a: 1\nb: 1\nc: 1\n")
    (tmp_path / "sub" / "mid.yaml").write_text("includes: [base.yaml]\nb: 2\n")
    (tmp_path / "other.yaml").write_text("c: 3\n")
    (tmp_path / "top.yaml").write_text("includes: [sub/mid.yaml, other.yaml]\na: 4\n")
    cfg = load_yaml(tmp_path / "top.yaml")
    assert (cfg.a, cfg.b, cfg.c) == (4, 2, 3)
    assert "includes" not in cfg


def test_include_cycle_is_an_error(tmp_path):
    (tmp_path / "x.yaml").write_text("includes: [y.yaml]\n")
    (tmp_path / "y.yaml").write_text("includes: [x.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_yaml(tmp_path / "x.yaml")


def test_env_vars_fill_env_section(layers_plugin, tmp_path, monkeypatch):
    monkeypatch.setenv("MMF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MMF_DATA_DIR", raising=False)
    monkeypatch.setenv("MMF_SAVE_DIR", str(tmp_path / "runs"))
    cfg = build_config(["model=layers_model", "datasets=layers_ds", f"env.user_dir={layers_plugin}"])
    assert cfg.env.cache_dir == str(tmp_path / "cache")
    assert cfg.env.data_dir == str(tmp_path / "cache" / "data")  # MMF default: <cache_dir>/data
    assert cfg.env.save_dir == str(tmp_path / "runs")
    monkeypatch.setenv("MMF_DATA_DIR", str(tmp_path / "d"))
    cfg = build_config(["model=layers_model", "datasets=layers_ds", f"env.user_dir={layers_plugin}"])
    assert cfg.env.data_dir == str(tmp_path / "d")
    out = save_config(cfg, tmp_path / "s")
    assert OmegaConf.load(out).env.data_dir == str(tmp_path / "d")


def test_user_dir_from_env_var(layers_plugin, monkeypatch):
    monkeypatch.setenv("MMF_USER_DIR", str(layers_plugin))
    cfg = build_config(["model=layers_model", "datasets=layers_ds"])
    assert cfg.env.user_dir == str(layers_plugin)


def test_legacy_keys_and_fp16_mapping(layers_plugin):
    cfg = build_config(["model=layers_model", "datasets=layers_ds", f"env.user_dir={layers_plugin}",
                        "training.fp16=True"])
    assert cfg.training.precision == "16-mixed"


def test_unquoted_list_override(layers_plugin):
    cfg = build_config(["model=layers_model", "datasets=layers_ds", f"env.user_dir={layers_plugin}",
                        "evaluation.metrics=[accuracy, vqa_accuracy]"])
    assert list(cfg.evaluation.metrics) == ["accuracy", "vqa_accuracy"]


def test_overrides_may_build_nested_keys_inside_an_empty_mapping(layers_plugin):
    cfg = build_config(["model=layers_model", "datasets=layers_ds", f"env.user_dir={layers_plugin}",
                        "checkpoint.pretrained_state_mapping.a.b=1", "checkpoint.pretrained_state_mapping.a.c=2"])
    assert cfg.checkpoint.pretrained_state_mapping.a == {"b": 1, "c": 2}
    with pytest.raises(ConfigError):  # but not inside a mapping that had keys
        build_config(["model=layers_model", "datasets=layers_ds", f"env.user_dir={layers_plugin}",
                      "training.early_stop.new.key=1"])
