"""NLVR2: a statement about a pair of images, true or false."""
