"""Landmark localisation (``brain_landmark``): data, heatmap network, metrics, writers."""

from echocare.tasks.landmarks.data import BRAIN_LANDMARK_NAMES, LandmarkHeatmapd, gaussian_heatmaps, grid_to_original, landmark_names_for, load_landmark_datalist, original_to_grid
from echocare.tasks.landmarks.metrics import LANDMARK_SCORE_NAMES, LandmarkScored, NanMeanOfOutput, SDR_RADII_PX, landmark_case_fields, landmark_metrics, landmark_scores, mean_position_baseline, radial_errors
from echocare.tasks.landmarks.writers import LandmarkOverlayWriter, LandmarkPredictionWriter, landmark_error_boxplot_figure, landmark_overlay_figure, predicted_landmarks
from echocare.tasks.landmarks.network import EchoCareLandmarkNet, LandmarkHeatmapLoss, coordinate_channels, decode_heatmaps, order_symmetric_pairs, soft_argmax

__all__ = ["BRAIN_LANDMARK_NAMES", "EchoCareLandmarkNet", "LANDMARK_SCORE_NAMES", "LandmarkHeatmapLoss", "LandmarkHeatmapd", "LandmarkOverlayWriter", "LandmarkPredictionWriter", "LandmarkScored", "NanMeanOfOutput", "SDR_RADII_PX", "coordinate_channels", "decode_heatmaps", "gaussian_heatmaps", "grid_to_original", "landmark_case_fields", "landmark_error_boxplot_figure", "landmark_metrics", "landmark_names_for", "landmark_overlay_figure", "landmark_scores", "load_landmark_datalist", "mean_position_baseline", "order_symmetric_pairs", "original_to_grid", "predicted_landmarks", "radial_errors", "soft_argmax"]
