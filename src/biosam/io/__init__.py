"""Reading images in every format users have, and writing results in the same geometry."""

from biosam.io.formats import check_labels_output, format_of, open_labels, read_image, write_labels
from biosam.io.images import write_image
from biosam.io.meta import ImageMeta
from biosam.io.planes import plane_index, read_plane

__all__ = [
    "ImageMeta",
    "check_labels_output",
    "format_of",
    "open_labels",
    "plane_index",
    "read_image",
    "read_plane",
    "write_image",
    "write_labels",
]
