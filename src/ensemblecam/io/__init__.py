"""Files in and out: layouts, slice and map stores, split files, NIfTI export, atomic writes."""
