"""The student trainer: stream a cache, distill, save a Hugging Face model.

In: a cache (``logitcache.storage``) and a student (pretrained or from a config).
Out: ``OUT/model`` loadable with ``AutoModelForCausalLM.from_pretrained``, metrics and
checkpoints. No teacher is ever loaded.
"""

from .config import TrainConfig, lr_multiplier
from .loop import TrainResult, evaluate, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "lr_multiplier", "train"]
