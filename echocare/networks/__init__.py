"""Networks: the EchoCare encoder, decoders, the pretraining network and task heads."""

from echocare.networks.checkpoint import (
    HeadMismatchWarning,
    initialise_network,
    load_network_checkpoint,
    merge_lora_state_dict,
)
from echocare.networks.decoders import UNETRDecoder
from echocare.networks.encoder import (
    ENCODER_SIZES,
    EchoCareEncoder,
    EncoderWeightsError,
    build_encoder,
    encoder_of,
    encoder_state_dict,
    load_encoder_weights,
    load_pretrained,
    save_encoder_weights,
)
from echocare.networks.pretrain import (
    EchoCarePretrainNet,
    PretrainLoss,
    expand_unit_mask,
    random_unit_mask,
    reconstruction_panel_tensors,
)
from echocare.networks.finetune import (
    FINETUNE_MODES,
    LoRALinear,
    LoRAQKV,
    apply_lora,
    configure_finetuning,
    ddp_wrap,
    lora_parameters,
    merge_lora,
)
from echocare.networks.report import EchoCareReportNet, ReportLoss, beam_search, greedy_search
from echocare.networks.tasks import CLIP_POOLINGS, EchoCareClassifier, EchoCareSegNet
from echocare.networks.regression import TEMPORAL_MODELS, EchoCareRegressor
from echocare.networks.fast import optimize_for_inference, reference_paths, use_fast_paths
from echocare.networks.export import (
    EXPORT_FORMATS,
    ExportError,
    OnnxRuntimeNetwork,
    build_bundle_network,
    export_bundle,
    load_exported,
    read_export_metadata,
)
