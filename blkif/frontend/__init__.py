"""The blkif frontend: what a guest's block driver does, as a library."""
