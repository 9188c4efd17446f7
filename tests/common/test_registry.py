import pytest

from mmf_plugins.common.registry import Registry, RegistryError


def test_register_and_get_every_kind():
    r = Registry()
    for kind in ("model", "builder", "processor", "metric", "loss", "optimizer", "scheduler", "encoder",
                 "extractor", "feature_writer", "converter"):
        deco = getattr(r, f"register_{kind}")

        @deco("thing")
        class Thing:
            pass

        assert r.get_class(kind, "thing") is Thing
    assert r.get_model_class("thing") is not None
    assert r.get_converter("thing") is not None


def test_duplicate_name_is_an_error():
    r = Registry()
    r.register_model("soho")(type("A", (), {}))
    with pytest.raises(RegistryError, match="already registered"):
        r.register_model("soho")(type("B", (), {}))


def test_unknown_name_lists_registered_and_closest():
    r = Registry()
    for n in ("soho", "vinvl", "vl_bert"):
        r.register_model(n)(type(n, (), {}))
    with pytest.raises(KeyError) as e:
        r.get_model_class("sohoo")
    msg = str(e.value)
    assert "unknown model 'sohoo'" in msg and "soho, vinvl, vl_bert" in msg and "Did you mean 'soho'" in msg
    assert r.get_model_class("sohoo", none_if_missing=True) is None


def test_runtime_state_store():
    r = Registry()
    r.register("vqa2_num_final_outputs", 3129)
    assert r.get("vqa2_num_final_outputs") == 3129
    assert r.get("missing", default=7) == 7
    assert r.unregister("vqa2_num_final_outputs") == 3129


def test_global_registry_has_builtin_components():
    from mmf_plugins import registry, setup_imports

    setup_imports()
    assert "adamw" in registry.names("optimizer")
    assert {"warmup_linear", "warmup_cosine", "multistep"} <= set(registry.names("scheduler"))
    assert "lightning" in registry.names("trainer")
