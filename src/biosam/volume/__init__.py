"""3D segmentation of volumes: propagation of prompted objects through slices, and 3D objects from 2D ones."""

from biosam.volume.link import SliceLinker, link_slices
from biosam.volume.propagate import PropagationSettings, VolumeSegmentation, group_objects, segment_volume

__all__ = ["PropagationSettings", "SliceLinker", "VolumeSegmentation", "group_objects", "link_slices", "segment_volume"]
