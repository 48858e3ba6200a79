"""Networks for Discus: registry, configs, preprocessing, localizer, classifiers, Grad-CAM.

This package never imports pydicom. Import submodules explicitly.
"""
