"""One module per pipeline stage: the files it reads and writes."""
