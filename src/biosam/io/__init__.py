"""Reading images in every format users have, and writing results in the same geometry."""

from biosam.io.formats import check_labels_output, format_of, open_labels, read_image, write_labels
from biosam.io.images import write_image
from biosam.io.meta import ImageMeta
from biosam.io.planes import plane_index, read_plane
from biosam.io.volumes import zyx_volume
from biosam.io.voxel_size import VoxelSize, voxel_size_of

__all__ = [
    "ImageMeta",
    "VoxelSize",
    "check_labels_output",
    "format_of",
    "open_labels",
    "plane_index",
    "read_image",
    "read_plane",
    "voxel_size_of",
    "write_image",
    "write_labels",
    "zyx_volume",
]
