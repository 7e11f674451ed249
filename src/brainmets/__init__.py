"""brainmets: find and outline brain lesions in MRI slices with U-Net++ and Attention U-Net."""

__version__ = "0.1.0"
