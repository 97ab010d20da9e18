"""prefixtune: prefix-tuning (Li & Liang 2021) for frozen Hugging Face language models.

    from prefixtune import PrefixConfig, PrefixTuningModel, MultiPrefixModel, load_base_model
"""

from .config import GenerateConfig, ModelConfig, PrefixConfig, TextFormat
from .model import PrefixTuningModel
from .base_model import DEFAULT_MODEL, load, load_base_model
from .multi import MultiPrefixModel
from .prefix import PrefixKV

__version__ = "0.1.0"
__all__ = ["PrefixConfig", "TextFormat", "GenerateConfig", "ModelConfig", "PrefixTuningModel", "MultiPrefixModel",
           "PrefixKV", "load", "load_base_model", "DEFAULT_MODEL"]
