"""Oriented-ellipse detection (``focus_det``): data, network, metrics, writers."""

from echocare.tasks.detection.data import DecodeEllipsesd, DetectionCased, EllipseTargetsd, RandEllipseAffined, detection_case_fields, ellipse_rows, load_detection_datalist, resize_matrix
from echocare.tasks.detection.metrics import COCO_IOU_THRESHOLDS, DETECTION_SCORE_NAMES, DetectionScore, affine_ellipses, average_precision, cardiothoracic_ratio, detection_metrics, detection_score_names, detection_scores, ellipse_iou, ellipse_iou_matrix, ellipse_polygon, match_detections, mean_ellipse_baseline, polygon_area
from echocare.tasks.detection.writers import EllipseOverlayWriter, EllipsePredictionWriter, draw_ellipses
from echocare.tasks.detection.network import ELLIPSE_CHANNELS, EchoCareEllipseDetector, EllipseDetectionLoss, decode_ellipses, encode_ellipses

__all__ = ["COCO_IOU_THRESHOLDS", "DETECTION_SCORE_NAMES", "DecodeEllipsesd", "DetectionCased", "DetectionScore", "ELLIPSE_CHANNELS", "EchoCareEllipseDetector", "EllipseDetectionLoss", "EllipseOverlayWriter", "EllipsePredictionWriter", "EllipseTargetsd", "RandEllipseAffined", "affine_ellipses", "average_precision", "cardiothoracic_ratio", "decode_ellipses", "detection_case_fields", "detection_metrics", "detection_score_names", "detection_scores", "draw_ellipses", "ellipse_iou", "ellipse_iou_matrix", "ellipse_polygon", "ellipse_rows", "encode_ellipses", "load_detection_datalist", "match_detections", "mean_ellipse_baseline", "polygon_area", "resize_matrix"]
