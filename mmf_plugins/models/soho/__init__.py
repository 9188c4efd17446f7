"""SOHO ("Seeing Out of tHe bOx", Huang et al., CVPR 2021): end-to-end grid vision-language model with a
visual dictionary. ``modeling_soho.py`` holds the model (registered as ``soho``), ``visual_dictionary.py``
the codebook, ``convert_soho.py`` the converter for researchmm/soho checkpoints (registered as ``soho``)."""
