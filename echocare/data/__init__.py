"""Data: readers, transforms, phantoms, datalist converters and checks."""

from echocare.data.augment import AnatomyLabeld, RandColorJitterd, RandGrayscaled, RandResizedCropd
from echocare.data.checks import DatalistError, check_image_size, list_inputs, load_datalist
from echocare.data.readers import (
    UltrasoundReadError,
    count_frames,
    detect_format,
    iter_frames,
    read_metadata,
    read_ultrasound,
)
from echocare.data.phantom import PRETRAIN_ANATOMIES, generate_demo_data, make_phantom_image
from echocare.data.samplers import ResumableSampler
from echocare.data.skipping import SKIPPED_KEY, SkipUnreadableDataset, skipped_row
from echocare.data.transforms import LoadUltrasound, LoadUltrasoundd
from echocare.data.supervised import (
    ClassLabeld,
    EvalSpacingd,
    LabelMapError,
    LoadClipd,
    LoadFramed,
    LoadLabelMapd,
    class_weights,
    clip_frame_count,
    datalist_info,
    expand_frames,
    load_task_datalist,
    mask_values_for,
    read_clip,
    read_label_map,
    subsample_training,
)
from echocare.data.regression import RegressionOutputd, RegressionTargetd, load_regression_datalist, regression_inputs
