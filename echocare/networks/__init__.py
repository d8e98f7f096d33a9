"""Networks: the EchoCare encoder, decoders, the pretraining network and task heads."""

from echocare.networks.checkpoint import HeadMismatchWarning, initialise_network, load_network_checkpoint, merge_lora_state_dict
from echocare.networks.decoders import UNETRDecoder
from echocare.networks.encoder import ENCODER_SIZES, EchoCareEncoder, EncoderWeightsError, build_encoder, encoder_of, encoder_state_dict, load_encoder_weights, load_pretrained, save_encoder_weights
from echocare.networks.finetune import FINETUNE_MODES, LoRALinear, LoRAQKV, apply_lora, configure_finetuning, ddp_wrap, lora_parameters, merge_lora
from echocare.networks.fast import optimize_for_inference, reference_paths, use_fast_paths
from echocare.networks.precision import PRECISIONS, BF16Inference, cpu_isa, with_precision
from echocare.networks.export import EXPORT_FORMATS, ExportError, OnnxRuntimeNetwork, build_bundle_network, export_bundle, load_exported, load_trained_network, read_export_metadata

__all__ = ["BF16Inference", "ENCODER_SIZES", "EXPORT_FORMATS", "EchoCareEncoder", "EncoderWeightsError", "ExportError", "FINETUNE_MODES", "HeadMismatchWarning", "LoRALinear", "LoRAQKV", "OnnxRuntimeNetwork", "UNETRDecoder", "apply_lora", "build_bundle_network", "build_encoder", "configure_finetuning", "ddp_wrap", "encoder_of", "encoder_state_dict", "export_bundle", "initialise_network", "load_encoder_weights", "load_exported", "load_network_checkpoint", "load_pretrained", "load_trained_network", "lora_parameters", "merge_lora", "merge_lora_state_dict", "PRECISIONS", "cpu_isa", "optimize_for_inference", "read_export_metadata", "reference_paths", "save_encoder_weights", "use_fast_paths", "with_precision"]
