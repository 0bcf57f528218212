"""biosam's napari plugin (npe2): readers and a labels writer that keep the geometry, sample data, and the
annotation widgets.

The manifest is ``napari.yaml`` beside this file. Importing this package imports neither napari nor Qt:
napari imports the modules the manifest names (``reader``, ``writer``, ``sample``, the widgets) when it
needs them.
"""
