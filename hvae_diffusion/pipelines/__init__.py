"""The pipelines: unconditional, classifier-guided and classifier-free guided sampling of the diffusion HVAE."""

from .pipeline_classifier_free import ClassifierFreeGuidancePipeline
from .pipeline_classifier_guided import ClassifierGuidedPipeline
from .pipeline_hvae import HVAEPipeline
from .sampling import HVAESamplingPipeline, null_class_label
from .serialization import register_pipeline_classes

register_pipeline_classes(HVAEPipeline, ClassifierGuidedPipeline, ClassifierFreeGuidancePipeline)
