"""The project file, one typed YAML: each section is defined beside the stage it sets (`seed/settings.py`,
`llm/settings.py`, `teacher/settings.py`, `annotate/settings.py`, `curation/settings.py`, `train/settings.py` and each
method's settings in `train/methods/`, `evaluation/settings.py`), `operations:` in `config/operations.py`, and
`ProjectConfig`, which assembles them and checks what crosses sections, in `config/project.py`. Every name is
re-exported here: `from omnithought_dagster.config import ...` is what code above the stages imports.
"""

from omnithought_dagster.annotate.settings import AnnotationConfig
from omnithought_dagster.config.operations import EcsPlacement, K8sPlacement, OperationsConfig
from omnithought_dagster.config.project import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_NAME,
    SOURCES_PARTITIONS,
    ProjectConfig,
    StoreConfig,
    find_config_path,
    load_config,
    parse_config,
)
from omnithought_dagster.curation.settings import CurationConfig, DecontaminationConfig, RecipeConfig, RulesConfig, SelectionConfig
from omnithought_dagster.evaluation.settings import EvaluationConfig
from omnithought_dagster.ledger.settings import CostsConfig, Price
from omnithought_dagster.llm.settings import LLMConfig, TeacherConfig
from omnithought_dagster.seed.settings import (
    MULTI_TURN_DESCRIPTION,
    SYNTHETIC_FAMILIES,
    FieldMap,
    HFSourceConfig,
    JsonSourceConfig,
    MultiTurn,
    SeedSettings,
    ShareGPTSourceConfig,
    SourceConfig,
    SyntheticSourceConfig,
)
from omnithought_dagster.settings_model import SOURCE_NAME_PATTERN, ConfigError, SettingsModel, resolve_path
from omnithought_dagster.teacher.settings import GenerationConfig, PromptConfig, ThresholdConfig
from omnithought_dagster.train.methods.grpo import GRPOSettings
from omnithought_dagster.train.methods.kd import DistillSettings
from omnithought_dagster.train.methods.opsd import OPSDSettings
from omnithought_dagster.train.methods.prefix_mask_kd import PrefixMaskSettings
from omnithought_dagster.train.settings import BASELINE_RECIPE, LoraSettings, StudentConfig, TrainingConfig

__all__ = [
    "BASELINE_RECIPE",
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_NAME",
    "MULTI_TURN_DESCRIPTION",
    "SOURCES_PARTITIONS",
    "SOURCE_NAME_PATTERN",
    "SYNTHETIC_FAMILIES",
    "AnnotationConfig",
    "ConfigError",
    "CostsConfig",
    "CurationConfig",
    "DecontaminationConfig",
    "DistillSettings",
    "EcsPlacement",
    "EvaluationConfig",
    "FieldMap",
    "GRPOSettings",
    "GenerationConfig",
    "HFSourceConfig",
    "JsonSourceConfig",
    "K8sPlacement",
    "LLMConfig",
    "LoraSettings",
    "MultiTurn",
    "OPSDSettings",
    "OperationsConfig",
    "PrefixMaskSettings",
    "Price",
    "ProjectConfig",
    "PromptConfig",
    "RecipeConfig",
    "RulesConfig",
    "SeedSettings",
    "SelectionConfig",
    "TeacherConfig",
    "SettingsModel",
    "ShareGPTSourceConfig",
    "SourceConfig",
    "StoreConfig",
    "StudentConfig",
    "SyntheticSourceConfig",
    "ThresholdConfig",
    "TrainingConfig",
    "find_config_path",
    "load_config",
    "parse_config",
    "resolve_path",
]
