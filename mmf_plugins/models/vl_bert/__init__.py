"""VL-BERT (Su et al., ICLR 2020): the model (``modeling_vl_bert.py``, registered as ``vl_bert``) and the
converter for the released jackroos/VL-BERT ``.model`` checkpoints (``convert_vl_bert.py``, registered as
``vl_bert``)."""
