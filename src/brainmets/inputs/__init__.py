"""The input side: what a study arrives as, brought onto one grid for the engine.

    readers       bytes -> slices and volumes (raster, DICOM, NIfTI), sizes checked before decoding
    dicom         DICOM instances -> ordered series, each's channel guessed from its tags, its voxels as a Scan
    cases         NIfTI case folders (BraTS, nnU-Net namings) -> which file is which sequence
    geometry      Scan: one series or volume with its grid in patient coordinates (SimpleITK)
    registration  rigid registration of a sequence onto FLAIR (patient motion no header records)
    align         every channel's scan onto FLAIR's axial grid, and how each got there
    study         any of these -> Study: the model's input slices, what they came from, masks back to FLAIR's grid
    errors        StudyError: what is wrong with an input, answered with a 4xx
"""
