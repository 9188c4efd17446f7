"""Object detectors that produce region features (VinVL X152-C4 on torchvision ops), and their converters."""
