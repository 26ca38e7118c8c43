"""`nerfstudio.dataparser_configs` entry point. Separate from method_configs.py on purpose: nerfstudio loads
dataparser plugins while its own dataparser registry is half-initialised, so this module may import only the
dataparser itself."""

from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from nerfstudio_splat_ext.dataparsers.llff_dataparser import LLFFDataParserConfig
from nerfstudio_splat_ext.dataparsers.splat_ext_dataparser import SplatExtDataParserConfig

splat_ext_data = DataParserSpecification(
    config=SplatExtDataParserConfig(),
    description="Blender or nerfstudio layout, detected automatically, with clear errors for bad input files.",
)

llff_data = DataParserSpecification(
    config=LLFFDataParserConfig(),
    description="Forward-facing LLFF scenes (poses_bounds.npy + images_N), NeRF's recentring, scaling and hold-out.",
)
