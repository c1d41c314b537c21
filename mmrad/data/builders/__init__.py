"""Data set builders, registered by name in :data:`BUILDERS`."""

from mmrad.data.builders import mmrad_layout, mvtec, synthetic, visa  # noqa: F401
from mmrad.data.builders.base import BUILDERS, BuildLog, DataBuildError, Draft

__all__ = ["BUILDERS", "BuildLog", "DataBuildError", "Draft"]
