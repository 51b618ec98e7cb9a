"""Architecture registry: ``build_model('resnet18_8x', (3, 32, 32), 10, mean, std)``."""

from toolkit.models.registry import (available_architectures, build_model, count_trainable_params,
                                     get_architecture, register_architecture)

__all__ = ["available_architectures", "build_model", "count_trainable_params", "get_architecture",
           "register_architecture"]
