from agecls.models.backbones import Backbone, PretrainedWeightsError, build_backbone
from agecls.models.heads import MLPHead
from agecls.models.module import AgeRegressor

__all__ = ["AgeRegressor", "Backbone", "MLPHead", "PretrainedWeightsError", "build_backbone"]
