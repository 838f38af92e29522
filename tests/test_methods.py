"""A method is one module (train/methods/): the registry, the project file's method settings, and a toy method that
is registered from outside the package and trains through the asset without any other file knowing it."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
from pydantic import ValidationError
from test_student import TRAINING

from omnithought_dagster.config import StudentConfig, load_config
from omnithought_dagster.defs import FILTER_JOB, SUBSET_JOB, TRAIN_JOB
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.train.launch import method_hash, run_method
from omnithought_dagster.train.methods import BUILT_IN, METHODS, Method, method_of, register, unregister

from conftest import materializations, run_job, write_config
from curation_data import build_store

TOY = '''
"""A toy method for tests: SFT whose loss is scaled by its one setting, reporting the scale."""

from pydantic import Field

from omnithought_dagster.settings_model import SettingsModel
from omnithought_dagster.train.methods import Method, register


class ToySettings(SettingsModel):
    scale: float = Field(gt=0, le=1)


class Toy(Method):
    name = "toy"
    settings_model = ToySettings
    settings_needed = "at least `scale`"
    reports = ("toy_scale",)

    def trainer(self, counting_trainer, *, model, teacher, method, vl, args, train_set, eval_set, callbacks, model_dir):
        base = counting_trainer()

        class Scaled(base):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                return (loss[0] * method["scale"], loss[1]) if return_outputs else loss * method["scale"]

        return Scaled(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=vl.collate,
                      callbacks=callbacks)

    def results(self, logged, history, method, trainer):
        return {"toy_scale": method["scale"]}, {"method": self.name, "toy_scale": method["scale"]}

    def describe(self, student, method):
        return f"toy (loss x {method['scale']})"


METHOD = Toy()
register(METHOD)
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy method's module in a folder of its own, imported (which registers it); gone again afterwards."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "omnithought_toy_method.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(plugins))
    module = importlib.import_module("omnithought_toy_method")
    try:
        yield plugins, module
    finally:
        unregister("toy")
        sys.modules.pop("omnithought_toy_method", None)


def test_the_built_in_methods_are_registered_by_name():
    assert list(METHODS)[:5] == ["sft", "kd", "prefix_mask_kd", "opsd", "grpo"] and BUILT_IN >= {"sft", "grpo"}
    assert method_of(None) is METHODS["sft"] and method_of({"name": "kd"}) is METHODS["kd"]
    with pytest.raises(SystemExit, match="no training method 'nope'"):
        method_of({"name": "nope"})
    with pytest.raises(ValueError, match="registered already"):
        register(type("Other", (Method,), {"name": "kd"})())


def test_the_gpu_check_runs_every_built_in_method_by_its_own_short_run():
    from omnithought_dagster import gpu_check

    assert list(gpu_check.METHODS) == [name for name in METHODS if name in BUILT_IN]  # its default list, without importing the registry
    starts = {name: METHODS[name].short_run_starts_from for name in gpu_check.METHODS}
    assert all(after is None or gpu_check.METHODS.index(after) < gpu_check.METHODS.index(name) for name, after in starts.items())
    for name in gpu_check.METHODS:  # each method's short-run settings are valid settings of it
        settings = METHODS[name].short_run_settings("/models/teacher", 16)
        StudentConfig(name="s", method=name, **({name: settings} if settings else {}))
    assert METHODS["grpo"].short_run({"rewards": [0.1, 0.4]}) == {"reward_first": 0.1, "reward_last": 0.4}


def test_the_project_file_names_a_registered_method_and_its_settings_only():
    assert StudentConfig(name="s").settings is None
    kd = StudentConfig(name="s", method="kd", kd={"teacher": "tiny:teacher"})
    assert kd.settings.teacher == "tiny:teacher" and kd.kd is kd.settings
    assert StudentConfig(name="s", method="opsd").settings.context == "trace"  # every opsd setting has a default
    with pytest.raises(ValidationError, match="unknown method 'toy'; methods: sft, kd"):
        StudentConfig(name="s", method="toy")
    with pytest.raises(ValidationError, match="kd.weight: Input should be less than or equal to 1"):
        StudentConfig(name="s", method="kd", kd={"teacher": "t", "weight": 2})
    with pytest.raises(ValidationError, match="kdd: unknown field"):
        StudentConfig(name="s", method="kd", kdd={"teacher": "t"})
    with pytest.raises(ValidationError, match="`grpo:` settings are given but method is 'kd'"):
        StudentConfig(name="s", method="kd", kd={"teacher": "t"}, grpo={"start_from": "x"})


def test_a_built_in_methods_spec_and_checkpoint_id_are_what_they_were(tmp_path):
    student = StudentConfig(name="s", method="opsd", opsd={"context": "answer"})
    spec = run_method(student, tmp_path)
    assert spec["name"] == "opsd" and spec["context"] == "answer" and "module" not in spec
    # the id a store written before the registry holds for this method (content_id of the method's identity)
    assert method_hash(spec) == method_hash({"name": "opsd", **student.settings.model_dump(mode="json")})
    assert run_method(StudentConfig(name="s"), tmp_path) is None  # sft: no method, ids unchanged


def test_a_toy_method_registered_outside_the_package_trains_through_the_asset(toy, tmp_path, instance):
    plugins, module = toy
    assert METHODS["toy"] is module.METHOD
    with pytest.raises(ValidationError, match="toy.scale: Input should be greater than 0"):
        StudentConfig(name="t", method="toy", toy={"scale": 0})
    build_store(tmp_path / "store", n_samples=24)
    config = load_config(
        write_config(
            tmp_path,
            [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}],
            recipes=[{"name": "even", "size": 12, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}}],
            students=[{"name": "toy", "model": "tiny:student", "method": "toy", "toy": {"scale": 0.5}}],
            # the training process finds the plug-in where the project file says (the spec names its module)
            training={**TRAINING, "env": {"PYTHONPATH": str(plugins)}},
        )
    )
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    assert run_job(config, instance, SUBSET_JOB, "even").success
    result = run_job(config, instance, TRAIN_JOB, "even|toy")
    assert result.success
    meta = materializations(result)["student_checkpoints"]
    assert meta["method"] == "toy" and meta["toy_scale"] == 0.5
    manifest = CorpusStore(config.store.root).checkpoints.manifest(meta["checkpoint_id"])
    assert manifest["train_spec"]["method"] == {"name": "toy", "scale": 0.5, "module": "omnithought_toy_method"}
    assert manifest["results"] == {"toy_scale": 0.5}
