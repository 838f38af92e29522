"""The `lmms_eval.models` entry point: a callable, so lmms-eval's registry is imported only when it calls.

(lmms-eval loads entry points while its own models package initialises; a module importing
lmms-eval at its top would be imported half-way through that and fail.)
"""


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="omnithought_vl", simple_class_path="omnithought_dagster.evaluation.lmms_plugin.OmniThoughtVL")]
