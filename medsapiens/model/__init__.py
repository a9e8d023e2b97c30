"""The MedSapiens model: the Sapiens ViT backbone (timm), checkpoint loading, the shared
multi-head landmark decoder and its loss, optimiser parameter groups, LoRA, and cost estimates."""
from medsapiens.model.archs import ARCHS, DEFAULT_IMG_SIZE, DEFAULT_TRUNK_WIDTH, ArchSpec, feature_grid, get_arch
from medsapiens.model.backbone import SapiensViT, build_backbone
from medsapiens.model.cost import MemoryEstimate, Split, count_params, forward_flops, memory_estimate, training_flops
from medsapiens.model.decoder import HeadOutput, MultiHeadDecoder
from medsapiens.model.landmark_model import LandmarkModel, ModelConfig, build_model
from medsapiens.model.lora import (
    LAYER_DECAY_APPLIES_WHEN,
    LoraConfig,
    apply_lora,
    base_backbone,
    count_trainable,
    merge_lora,
)
from medsapiens.model.loss import HeatmapLoss, LandmarkObjective, heatmap_loss
from medsapiens.model.param_groups import param_groups
from medsapiens.model.weights import (
    LoadReport,
    convert_checkpoint,
    load_backbone,
    load_checkpoint,
    load_state,
    save_backbone,
)
