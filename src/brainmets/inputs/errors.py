"""The input side's errors: each says what is wrong with the input, naming the series or file, and what is
accepted. The API answers them with a 4xx (api/errors.py)."""


class StudyError(ValueError):
    """The study cannot be segmented as given; the message says what is wrong and what is accepted."""


class StudyTooLarge(StudyError):
    """Over a limit: slices in a series, voxels, zip entries, uncompressed size or compression ratio."""
