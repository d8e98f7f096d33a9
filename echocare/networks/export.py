"""Exported bundle networks: traced TorchScript and ONNX files that carry the bundle metadata, and
an ONNX Runtime module that stands in for a bundle's ``network``.

What is exported is the bundle's ``network_def`` with its checkpoint, in eval mode with MONAI's
reference forwards (not :func:`~echocare.networks.fast.use_fast_paths`, whose inference kernels
are oneDNN-only ops):

* segmentation (``EchoCareSegNet``): ``image`` (B, 3, S, S) -> ``pred`` logits (B, C, S, S);
* classification (``EchoCareClassifier``): ``image`` (B, 3, S, S), or (B, F, 3, S, S) for clip
  bundles (``clip_frames`` F in the config) -> ``pred`` logits (B, C);
* detection (``focus_det``), landmarks (``brain_landmark``), enhancement (``usenhance``):
  ``image`` (B, 3, S, S) -> ``pred``, the network's raw output (ellipse maps, heatmaps, the
  enhanced image; the bundles' postprocessing decodes it);
* regression (``camus_ef``): ``image`` (B, T, 3, S, S) with T the config's ``num_frames``
  ((B, 3, S, S) for still images, ``num_frames: 1``) -> ``pred`` (B, 1), the normalised value;
* pretraining (``EchoCarePretrainNet``): ``image`` (B, 3, S, S) and ``unit_mask``
  (B, S/mask_unit, S/mask_unit) bool -> ``reconstruction`` (B, 3, S, S), ``anatomy_logits``
  (B, N), ``pixel_mask`` (B, 1, S, S). Drawing the random mask and turning anatomy scores
  into a path stay in Python (an all-False mask gives the unmasked pass).

S is the bundle's ``image_size``. TorchScript is traced at that size; ONNX has a dynamic batch
axis (named ``batch``) on every input and output. Both files carry ``metadata.json``: the
bundle's metadata plus an ``echocare_export`` section (bundle, inputs and outputs with shapes,
class names, network size, checkpoint), read back by :func:`read_export_metadata`.
:func:`export_bundle` checks the exported network against PyTorch on random inputs (largest
absolute difference at most :data:`TOLERANCE` in float32).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from echocare import __version__ as echocare_version
from echocare.bundle import resolve_bundle, resolve_overlays
from echocare.networks.checkpoint import load_network_checkpoint
from echocare.networks.fast import reference_paths
from echocare.networks.precision import check_precision, with_precision

__all__ = [
    "EXPORT_FORMATS",
    "TOLERANCE",
    "ExportError",
    "OnnxRuntimeNetwork",
    "build_bundle_network",
    "example_inputs",
    "export_bundle",
    "load_exported",
    "load_trained_network",
    "read_export_metadata",
]

#: Formats of :func:`export_bundle`.
EXPORT_FORMATS = ("torchscript", "onnx")
#: Largest absolute difference allowed between the exported network and PyTorch (float32).
TOLERANCE = 1e-4
#: ONNX opset of the exports (LayerNormalization is native from 17).
ONNX_OPSET = 17
#: Key of the metadata in TorchScript extra files and ONNX metadata_props.
METADATA_KEY = "metadata.json"


class ExportError(RuntimeError):
    """An export that failed or does not match PyTorch; the message names the file."""


class _TupleOutputs(nn.Module):
    """A network whose dict output (pretraining) is returned as a tuple in ``keys`` order, the
    form tracing and ONNX need."""

    def __init__(self, network: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.network = network
        self.keys = list(keys)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network(*inputs)
        return tuple(out[k] for k in self.keys)


def _bundle_parser(bundle: str, config: str | Sequence[str] | None, overrides: Mapping[str, Any] | None):
    """(bundle name, configs folder, ConfigParser of inference.yaml + overlays with overrides)."""
    from monai.bundle import ConfigParser

    name, configs = resolve_bundle(bundle)
    files = [str(configs / "inference.yaml"), *resolve_overlays(config, configs)]
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(dict(overrides or {}))
    return name, configs, parser


def build_bundle_network(
    bundle: str,
    checkpoint: str | Path,
    config: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The bundle's network with ``checkpoint`` loaded, in eval mode on CPU, and its I/O description.

    Args:
        bundle: a bundle name (``bundles/NAME``) or folder.
        checkpoint: whole-network weights (a file or ``models:/NAME@ALIAS``).
        config: overlay config(s) merged after ``inference.yaml`` (variants, e.g. ``carotid.yaml``).
        overrides: config ids to set (``network_size``, ``image_size``, ``class_names``, ...).
        tracking_uri: the MLflow store of a ``models:/`` checkpoint.

    Returns:
        ``(module, spec)``: ``module`` maps the input tensors to the output tensor (a tuple in
        ``spec["outputs"]`` order for the pretraining network);
        ``spec`` = ``{"bundle", "network", "inputs": {name: shape with "batch" first},
        "outputs": [names], "class_names", "network_size", "image_size", "checkpoint"}``.
    """
    name, configs, parser = _bundle_parser(bundle, config, overrides)
    height, width = parser.get_parsed_content("spatial_size")
    if str(parser.get("network_def", {}).get("_target_", "")).endswith("EchoCareReportNet"):
        raise ExportError(
            f"{name}: report generation (a text decoder run by beam search, with its tokenizer) is not exported as one "
            "traced network; run the bundle's inference.yaml"
        )
    network = parser.get_parsed_content("network_def", instantiate=True)
    network = load_network_checkpoint(network, str(checkpoint), tracking_uri=tracking_uri)
    network = reference_paths(network.cpu().eval())
    inputs: dict[str, list[Any]] = {"image": ["batch", 3, height, width]}
    unit = getattr(network, "mask_unit", None)  # networks that take a unit mask (pretraining) name its unit
    if unit is not None:
        inputs["unit_mask"] = ["batch", height // unit, width // unit]
        outputs = ["reconstruction", "anatomy_logits", "pixel_mask"]
        module: nn.Module = _TupleOutputs(network, outputs)
    else:
        # Clip classifiers (clip_frames) and sequence regressors (num_frames > 1) take (B, T, 3, H, W).
        frames = next((int(parser.get_parsed_content(k)) for k in ("clip_frames", "num_frames") if k in parser), 1)
        if "clip_frames" in parser or frames > 1:
            inputs["image"] = ["batch", frames, 3, height, width]
        outputs = ["pred"]
        module = network
    # What the output channels are: classes, or landmarks (brain_landmark); None for images and values.
    names_key = next((k for k in ("class_names", "landmark_names") if k in parser), None)
    class_names = parser.get_parsed_content(names_key) if names_key else None
    spec = {
        "bundle": name,
        "network": type(network).__name__,
        "inputs": inputs,
        "outputs": outputs,
        "class_names": list(class_names) if class_names is not None else None,
        "network_size": parser.get_parsed_content("network_size"),
        "image_size": [height, width],
        "checkpoint": str(checkpoint),
        "bundle_metadata": json.loads((configs / "metadata.json").read_text()) if (configs / "metadata.json").is_file() else {},
    }
    return module.eval(), spec


def example_inputs(spec: Mapping[str, Any], batch_size: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the shapes in ``spec["inputs"]``: images uniform in [0, 1], masks half True."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for name, shape in spec["inputs"].items():
        size = [batch_size if d == "batch" else int(d) for d in shape]
        if name == "unit_mask":
            tensors.append(torch.rand(size, generator=generator) < 0.5)
        else:
            tensors.append(torch.rand(size, generator=generator))
    return tuple(tensors)


def _metadata(spec: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    section = {k: v for k, v in spec.items() if k != "bundle_metadata"}
    section.update({"format": fmt, "echocare_version": echocare_version, "torch_version": torch.__version__})
    if fmt == "onnx":
        section["onnx_opset"] = ONNX_OPSET
    return {**dict(spec.get("bundle_metadata") or {}), "echocare_export": section}


def _export_torchscript(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: Path, metadata: dict[str, Any]) -> None:
    metadata["echocare_export"]["traced_batch_size"] = int(inputs[0].shape[0])
    with warnings.catch_warnings(), torch.no_grad():
        # Python-side shape checks and Swin's padding arithmetic are fixed at the traced size, as intended.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(module, inputs, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={METADATA_KEY: json.dumps(metadata)})


def _export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: Path, metadata: dict[str, Any],
                 input_names: list[str], output_names: list[str]) -> None:
    import onnx

    dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: dynamic_axes need it
        # MONAI's InstanceNorm has no running statistics: it normalises with the input's own in eval too.
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True")
        torch.onnx.export(
            module, inputs, str(out), dynamo=False, input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET, do_constant_folding=True,
        )
    model = onnx.load(str(out))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(model, str(out))


def export_bundle(
    bundle: str,
    checkpoint: str | Path,
    format: str,
    out: str | Path,
    config: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    batch_size: int = 1,
    verify: bool = True,
) -> dict[str, Any]:
    """Export the network of ``bundle`` with ``checkpoint`` to ``out`` as TorchScript or ONNX.

    Args:
        bundle, checkpoint, config, overrides, tracking_uri: as :func:`build_bundle_network`.
        format: ``torchscript`` (traced at ``image_size``) or ``onnx`` (dynamic batch axis).
        out: the file to write (folders are created).
        batch_size: batch of the tracing inputs (ONNX runs any batch; TorchScript is traced at it).
        verify: run the exported file on random inputs and compare with PyTorch; raise
            :class:`ExportError` when an output differs by more than :data:`TOLERANCE`.

    Returns:
        The metadata written into the file, plus ``max_abs_diff`` (per output) when verified.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {list(EXPORT_FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module, spec = build_bundle_network(bundle, checkpoint, config=config, overrides=overrides, tracking_uri=tracking_uri)
    inputs = example_inputs(spec, batch_size=batch_size, seed=0)
    metadata = _metadata(spec, format)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.TransformerEncoder's eval fast path is one fused op that ONNX has no export for (camus_ef).
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        if format == "torchscript":
            _export_torchscript(module, inputs, out, metadata)
        else:
            _export_onnx(module, inputs, out, metadata, list(spec["inputs"]), list(spec["outputs"]))
    except Exception as error:  # noqa: BLE001 - tracer and exporter raise many types
        raise ExportError(f"{out}: exporting {spec['bundle']} to {format} failed ({type(error).__name__}: {error})") from error
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if verify:
        # ONNX: another batch size than the traced one also checks the dynamic batch axis.
        check = example_inputs(spec, batch_size=batch_size if format == "torchscript" else batch_size + 1, seed=1)
        metadata["max_abs_diff"] = compare_exported(module, out, check)
        worst = max(metadata["max_abs_diff"].values())
        if not worst <= TOLERANCE:
            raise ExportError(
                f"{out}: the exported network differs from PyTorch by {worst:.3g} (> {TOLERANCE}) on "
                f"{metadata['max_abs_diff']}"
            )
    return metadata


def compare_exported(module: nn.Module, path: str | Path, inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Largest absolute difference per output between ``module`` (PyTorch) and the exported file on ``inputs``."""
    run, metadata = load_exported(path)
    names = metadata["echocare_export"]["outputs"]
    with torch.no_grad():
        expected = module(*inputs)
        got = run(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    return {n: float((e.float() - g.float()).abs().max()) for n, e, g in zip(names, expected, got)}


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata.json`` carried by an exported TorchScript (``.pt``/``.ts``) or ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported model not found")
    if _is_onnx(path):
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    else:
        extra = {METADATA_KEY: ""}
        _jit_load(path, extra)
        props = extra
    if not props.get(METADATA_KEY):
        raise ExportError(f"{path}: no {METADATA_KEY} in the file (not exported by echocare export?)")
    return json.loads(props[METADATA_KEY])


def _jit_load(path: Path, extra_files: dict[str, str] | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files or {})


def _is_onnx(path: Path) -> bool:
    """ONNX files are protobufs; TorchScript files are zip archives (``PK`` magic)."""
    with path.open("rb") as handle:
        return handle.read(2) != b"PK"


def load_exported(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """``(run, metadata)`` of an exported file: ``run(*tensors)`` returns the output tensor (or a
    tuple for several outputs), on CPU, through TorchScript or ONNX Runtime."""
    path = Path(path)
    metadata = read_export_metadata(path)
    if _is_onnx(path):
        return OnnxRuntimeNetwork(path), metadata
    module = _jit_load(path).eval()

    def run(*inputs: torch.Tensor) -> Any:
        # The plain interpreter: the profiling executor's first runs cost more than a tiny network's forward.
        with torch.no_grad(), torch.jit.optimized_execution(False):
            return module(*inputs)

    return run, metadata


class OnnxRuntimeNetwork(nn.Module):
    """An exported ONNX network run by ONNX Runtime on CPU, usable as a bundle's ``network``.

    Inputs are torch tensors (MONAI ``MetaTensor`` included), on any device; outputs are torch
    tensors on the first input's device. The bundle's pre- and post-processing, inferer and
    writers stay as they are: segmentation and classification ``inference.yaml`` take
    ``--onnx_model FILE`` and use this module instead of the PyTorch network.

    Args:
        path: the ``.onnx`` file from ``echocare export --format onnx``.
        num_threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``, so
            ``OMP_NUM_THREADS`` limits both alike).

    Forward:
        the exported inputs in order, e.g. ``image`` (B, 3, S, S) -> ``pred`` (B, C, S, S);
        a single output is returned as a tensor, several as a tuple.

    Raises:
        FileNotFoundError / ExportError: a missing file or one that ONNX Runtime cannot open.
        ValueError: an input whose shape differs from the exported one (other than the batch),
            naming the file and the expected shape.
    """

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
            raise ExportError(f"{self.path}: ONNX Runtime cannot open it ({type(error).__name__}: {error})") from error
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_shapes = [list(i.shape) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        custom = self.session.get_modelmeta().custom_metadata_map
        self.metadata = json.loads(custom[METADATA_KEY]) if METADATA_KEY in custom else {}

    def _feed(self, name: str, expected: list[Any], tensor: torch.Tensor) -> np.ndarray:
        shape = list(tensor.shape)
        fixed = [d if isinstance(d, int) else None for d in expected]
        if len(shape) != len(expected) or any(f is not None and f != s for f, s in zip(fixed, shape)):
            wanted = ["B" if f is None else f for f in fixed]
            raise ValueError(
                f"{self.path}: input {name!r} must be {tuple(wanted)} (the exported size), got {tuple(shape)}; "
                "run the bundle with the image_size (and clip_frames) the model was exported at"
            )
        array = tensor.detach().cpu()
        array = array.as_tensor() if hasattr(array, "as_tensor") else array  # MetaTensor -> plain tensor
        if array.dtype == torch.bool:
            return np.ascontiguousarray(array.numpy())
        return np.ascontiguousarray(array.float().numpy())

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path}: expects {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}")
        feed = {n: self._feed(n, s, t) for n, s, t in zip(self.input_names, self.input_shapes, inputs)}
        outputs = [torch.from_numpy(o).to(inputs[0].device) for o in self.session.run(self.output_names, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def load_trained_network(
    network: nn.Module,
    checkpoint: str | Path,
    onnx_model: str | Path | None = None,
    tracking_uri: str | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """A bundle's trained network for evaluation and inference (its ``network`` id).

    Args:
        network: the bundle's ``network_def``.
        checkpoint: its weights (a file, or ``models:/NAME@ALIAS``), loaded strictly by
            :func:`~echocare.networks.checkpoint.load_network_checkpoint`.
        onnx_model: an ``echocare export --format onnx`` file; when given, an
            :class:`OnnxRuntimeNetwork` of it is returned instead and ``checkpoint`` is not read.
        tracking_uri: the MLflow store of a ``models:/`` checkpoint.
        device: where the network goes (default: where it is).
        precision: ``fp32`` (the network as trained) or ``bf16``
            (:class:`~echocare.networks.precision.BF16Inference`: bf16 autocast; on the CPU with
            the fast paths and bfloat16 matrix weights). The bundles' ``precision`` id.
    """
    check_precision(precision)
    if onnx_model:
        if precision != "fp32":
            raise ValueError(f"{onnx_model}: precision {precision} applies to PyTorch networks; an ONNX model runs as exported (fp32)")
        loaded: nn.Module = OnnxRuntimeNetwork(onnx_model)
    else:
        loaded = load_network_checkpoint(network, checkpoint, tracking_uri=tracking_uri)
    loaded = loaded.to(device) if device is not None else loaded
    return with_precision(loaded, precision, device)
