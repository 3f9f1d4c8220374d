"""EditInstance (SafeEdit records), HParams / DINMConfig loading, the method registry."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from editkit.instance import GENERALIZATION_KEYS, EditInstance, InstanceError, load_instances

# --------------------------------------------------------------------------- EditInstance


@pytest.fixture(scope="module")
def records(safeedit_dev: Path) -> list[dict]:
    return json.loads(safeedit_dev.read_text(encoding="utf-8"))


def test_from_real_record(records: list[dict]) -> None:
    record = records[0]
    inst = EditInstance.from_record(record)
    assert inst.id == str(record["id"])
    assert inst.prompt == record["adversarial prompt"]
    assert inst.safe == record["safe generation"]
    assert inst.unsafe == record["unsafe generation"]
    assert inst.knowledge_prompt == record["knowledge constrain"]["prompt"]
    assert inst.knowledge_answer == record["knowledge constrain"]["answer"]
    assert inst.question == record["question"]
    assert inst.category == record["unsafety category"]
    gen = record["generalization test"]
    assert dict(inst.generalization) == {metric: gen[key] for key, metric in GENERALIZATION_KEYS.items()}


def test_every_dev_record_loads(safeedit_dev: Path, records: list[dict]) -> None:
    instances = load_instances(safeedit_dev)
    assert [i.id for i in instances] == [str(r["id"]) for r in records]
    assert all(len(i.generalization) == 4 for i in instances)


@pytest.mark.parametrize(
    "path, shown",
    [
        (("safe generation",), "safe generation"),
        (("adversarial prompt",), "adversarial prompt"),
        (("knowledge constrain", "answer"), "knowledge constrain.answer"),
        (("knowledge constrain", "prompt"), "knowledge constrain.prompt"),
        (("knowledge constrain",), "knowledge constrain"),
    ],
)
def test_missing_field_names_record_and_field(records: list[dict], path: tuple, shown: str) -> None:
    record = copy.deepcopy(records[3])
    holder = record
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    with pytest.raises(InstanceError) as err:
        EditInstance.from_record(record)
    message = str(err.value)
    assert f"record {record['id']}" in message
    assert shown in message


def test_empty_field_and_non_object(records: list[dict]) -> None:
    record = copy.deepcopy(records[0])
    record["unsafe generation"] = "   "
    with pytest.raises(InstanceError, match="unsafe generation"):
        EditInstance.from_record(record)
    with pytest.raises(InstanceError):
        EditInstance.from_record(["not", "a", "record"])  # type: ignore[arg-type]
    with pytest.raises(InstanceError, match="knowledge_answer"):
        EditInstance(prompt="p", safe="s", unsafe="u", knowledge_prompt="q", knowledge_answer="")


def test_require_generalization(records: list[dict]) -> None:
    record = copy.deepcopy(records[0])
    del record["generalization test"]
    assert EditInstance.from_record(record).generalization == {}
    with pytest.raises(InstanceError, match="generalization test"):
        EditInstance.from_record(record, require_generalization=True)
    record = copy.deepcopy(records[0])
    del record["generalization test"]["test input of other question input"]
    with pytest.raises(InstanceError, match="test input of other question input"):
        EditInstance.from_record(record, require_generalization=True)


def test_load_by_hash_id(safeedit_dev: Path, records: list[dict]) -> None:
    rid = records[5]["id"]
    (inst,) = load_instances(f"{safeedit_dev}#{rid}")
    assert inst.id == str(rid)
    assert inst.safe == records[5]["safe generation"]
    with pytest.raises(InstanceError, match="no record with id 999999"):
        load_instances(f"{safeedit_dev}#999999")


def test_load_ids_keep_requested_order(safeedit_dev: Path, records: list[dict]) -> None:
    wanted = [records[7]["id"], records[1]["id"], str(records[4]["id"])]  # ints and strings both work
    got = load_instances(safeedit_dev, ids=wanted)
    assert [i.id for i in got] == [str(w) for w in wanted]
    assert [i.id for i in load_instances(safeedit_dev, limit=3)] == [str(r["id"]) for r in records[:3]]


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_instances(tmp_path / "nope.json")


def test_skip_invalid_jsonl(tmp_path: Path, records: list[dict]) -> None:
    bad = copy.deepcopy(records[1])
    del bad["knowledge constrain"]["answer"]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [records[0], bad, records[2]]) + "\n", encoding="utf-8")
    with pytest.raises(InstanceError, match=f"record {bad['id']}"):
        load_instances(path)
    kept = load_instances(path, skip_invalid=True)
    assert [i.id for i in kept] == [str(records[0]["id"]), str(records[2]["id"])]


def test_to_record_round_trip(records: list[dict]) -> None:
    for record in records[:10]:
        inst = EditInstance.from_record(record)
        back = inst.to_record()
        assert EditInstance.from_record(back) == inst
        for key in ("adversarial prompt", "safe generation", "unsafe generation", "question", "knowledge constrain"):
            assert back[key] == record[key]
        for key in GENERALIZATION_KEYS:
            assert back["generalization test"][key] == record["generalization test"][key]
        json.dumps(back)  # JSON-ready


def test_edit_instance_is_frozen(instance: EditInstance) -> None:
    with pytest.raises(Exception):
        instance.safe = "changed"  # type: ignore[misc]


# --------------------------------------------------------------------------- HParams / DINMConfig

from editkit.methods.dinm import DINMConfig  # noqa: E402
from editkit.registry import get_method, hparams_path, list_methods, load_hparams, register_method  # noqa: E402


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "h.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_scientific_notation_is_float(tmp_path: Path) -> None:
    cfg = DINMConfig.from_yaml(_yaml(tmp_path, "method: dinm\nlr: 5e-4\nearly_stop_loss: 1e-4\nsteps: 3\n"))
    assert isinstance(cfg.lr, float) and cfg.lr == 5e-4
    assert isinstance(cfg.early_stop_loss, float) and cfg.early_stop_loss == 1e-4
    assert isinstance(cfg.steps, int) and cfg.steps == 3


def test_typed_coercion() -> None:
    cfg = DINMConfig.from_dict({"steps": 4.0, "use_suffix": "false", "norm_constraint": "1e-2", "layer": -1})
    assert cfg.steps == 4 and isinstance(cfg.steps, int)
    assert cfg.use_suffix is False
    assert cfg.norm_constraint == pytest.approx(0.01)
    assert cfg.layer == -1
    assert DINMConfig.from_dict({"norm_constraint": None}).norm_constraint is None
    with pytest.raises(ValueError, match="steps"):
        DINMConfig.from_dict({"steps": 2.5})
    with pytest.raises(ValueError, match="lr"):
        DINMConfig.from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match="use_suffix"):
        DINMConfig.from_dict({"use_suffix": "perhaps"})


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        DINMConfig.from_yaml(_yaml(tmp_path, "lr: 1e-3\nlearning_rate: 1e-3\n"))


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": 0}, "lr"),
        ({"c_edit": 0}, "c_edit"),
        ({"kl_weight": -1}, "kl_weight"),
        ({"norm_constraint": 0}, "norm_constraint"),
        ({"max_length": 4}, "max_length"),
    ],
)
def test_range_validation(settings: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DINMConfig.from_dict(settings)


def test_literal_fields() -> None:
    assert DINMConfig.from_dict({"chat_template": "none"}).chat_template == "none"
    assert DINMConfig.from_dict({"locate_mode": "reference"}).locate_mode == "reference"
    with pytest.raises(ValueError, match="chat_template"):
        DINMConfig.from_dict({"chat_template": "sometimes"})
    with pytest.raises(ValueError, match="locate_mode"):
        DINMConfig.from_dict({"locate_mode": "max"})


def test_method_key_mismatch(tmp_path: Path) -> None:
    assert DINMConfig.from_yaml(_yaml(tmp_path, "method: DINM\n")).lr == DINMConfig().lr
    with pytest.raises(ValueError, match="mend"):
        DINMConfig.from_yaml(_yaml(tmp_path, "method: mend\nlr: 1e-3\n"))
    with pytest.raises(ValueError, match="MEND"):
        DINMConfig.from_dict({"alg_name": "MEND"})


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mapping"):
        DINMConfig.from_yaml(_yaml(tmp_path, "- lr\n- steps\n"))
    with pytest.raises(FileNotFoundError):
        DINMConfig.from_yaml(tmp_path / "absent.yaml")


def test_replace_validates_and_copies() -> None:
    cfg = DINMConfig()
    new = cfg.replace(steps=3, lr="1e-2")
    assert (new.steps, new.lr) == (3, 0.01)
    assert (cfg.steps, cfg.lr) == (10, 5e-4)  # the original is untouched
    with pytest.raises(ValueError, match="steps"):
        cfg.replace(steps=0)


def test_yaml_round_trip() -> None:
    import yaml

    cfg = DINMConfig(lr=2e-3, steps=7, norm_constraint=0.5)
    data = yaml.safe_load(cfg.to_yaml())
    assert data["method"] == "dinm"
    assert DINMConfig.from_dict(data) == cfg
    assert "lr = 0.0005  # Adam learning rate" in DINMConfig.describe()


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-135m-guard40", "smollm2-135m-mid", "smollm2-135m-gated",
                                  "llama-2-7b-chat", "mistral-7b"])
def test_shipped_hparams_by_short_name(name: str) -> None:
    import yaml

    path = hparams_path("dinm", name)
    assert path.is_file(), f"{path} is missing"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_hparams("dinm", name)
    assert isinstance(cfg, DINMConfig)
    assert cfg == load_hparams("dinm", str(path)) == DINMConfig.from_yaml(path)
    assert cfg.lr == float(raw["lr"]) and cfg.steps == raw["steps"]
    # algorithm settings only: no paths, devices or seeds
    assert not {"device", "seed", "model_name", "model_path", "output_dir"} & set(raw)


def test_paper_settings_for_7b_models() -> None:
    for name in ("llama-2-7b-chat", "mistral-7b"):
        cfg = load_hparams("dinm", name)
        assert (cfg.lr, cfg.steps, cfg.c_edit) == (5e-4, 10, 0.1)


def test_load_hparams_sources(tmp_path: Path) -> None:
    assert load_hparams("dinm") == DINMConfig()
    assert load_hparams("DINM", {"steps": 2}).steps == 2
    obj = DINMConfig(steps=5)
    assert load_hparams("dinm", obj) is obj
    assert load_hparams("dinm", obj, lr=1e-2).lr == 1e-2 and obj.lr == 5e-4
    assert load_hparams("dinm", _yaml(tmp_path, "steps: 6\n")).steps == 6
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_hparams("dinm", "no-such-model")


def test_short_name_with_a_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model names often contain dots (qwen2.5-0.5b): a short name must not be read as a file suffix."""
    import editkit.registry as registry

    (tmp_path / "DINM").mkdir()
    (tmp_path / "DINM" / "qwen2.5-0.5b.yaml").write_text("method: dinm\nsteps: 4\n", encoding="utf-8")
    monkeypatch.setattr(registry, "PRESETS_DIR", tmp_path)
    assert load_hparams("dinm", "qwen2.5-0.5b").steps == 4


def test_registry() -> None:
    assert "dinm" in list_methods()
    spec = get_method("DINM")
    assert spec.config_class is DINMConfig
    with pytest.raises(ValueError, match="unknown editing method 'nope'"):
        get_method("nope")
    with pytest.raises(TypeError):
        register_method("bad", dict, object)  # type: ignore[arg-type]


from dataclasses import dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402

from editkit.hparams import HParams, hp  # noqa: E402


@dataclass
class _NullConfig(HParams):
    """Settings of a method registered from outside editkit (module level: type hints resolve)."""

    method: ClassVar[str] = "null-test"
    scale: float = hp(1.0, "a scale")


class _Null:
    calls: list = []

    def __init__(self, hparams: _NullConfig) -> None:
        self.hparams = hparams

    def edit(self, model, tokenizer, instance, **kwargs):
        import torch

        from editkit.patch import Patch
        from editkit.result import EditResult

        self.calls.append((instance.id, self.hparams.scale, kwargs.get("progress")))
        name = "model.norm.weight"
        delta = torch.zeros_like(dict(model.named_parameters())[name])
        return EditResult(method="null-test", patch=Patch.from_deltas(model, {name: delta}))


def test_registered_method_is_used(instance: EditInstance, tokenizer) -> None:
    """A method registered from outside goes through editkit.edit without editkit knowing its name."""
    import editkit
    import editkit.registry as registry
    from editkit.models import tiny_model

    register_method("null-test", _NullConfig, _Null)
    try:
        assert "null-test" in list_methods()
        result = editkit.edit(tiny_model("llama"), instance, tokenizer=tokenizer, method="null-test",
                              hparams={"scale": "2"})
        assert _Null.calls == [("t1", 2.0, False)]
        assert result.method == "null-test" and "total" in result.timings
    finally:
        registry._REGISTRY.pop("null-test", None)
