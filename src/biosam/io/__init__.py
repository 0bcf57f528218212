"""Reading images and writing results."""

from biosam.io.images import IMAGE_SUFFIXES, LABEL_SUFFIXES, read_image, write_image, write_labels

__all__ = ["IMAGE_SUFFIXES", "LABEL_SUFFIXES", "read_image", "write_image", "write_labels"]
