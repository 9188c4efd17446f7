"""VinVL / OSCAR+: the model (``modeling_vinvl``), its official-checkpoint converter (``convert_vinvl``)
and the data-side randomness of its training (``pretraining_data``)."""
