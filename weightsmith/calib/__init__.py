"""Calibration data: sources -> deterministic N x L token windows with a sha256 for the manifest."""

from weightsmith.calib.config import CalibConfig
from weightsmith.calib.windows import CalibrationData, load_calibration

__all__ = ["CalibConfig", "CalibrationData", "load_calibration"]
