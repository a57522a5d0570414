class DataError(ValueError):
    """A problem with a dataset folder, worded for the user: names the file and what is wrong."""
