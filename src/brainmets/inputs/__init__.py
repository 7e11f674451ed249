"""The input side: what a study arrives as, brought onto one grid for the engine.

    readers       bytes -> slices and volumes (raster, DICOM, NIfTI), sizes checked before decoding
    geometry      Scan: one series or volume with its grid in patient coordinates; resampling onto FLAIR's
    registration  rigid registration of a sequence onto FLAIR (unrecorded patient motion)
    dicom         DICOM instances -> ordered series, each's channel guessed from its tags
    cases         NIfTI case folders (BraTS, nnU-Net namings) -> which file is which sequence
    study         any of these -> Study: the model's input slices on the FLAIR grid, and how each got there
"""
