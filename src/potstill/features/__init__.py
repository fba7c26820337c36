"""Feature distillation: what to capture inside the models, and the terms built from it.

    hooks.py       forward hooks that capture the mapped layers' hidden states and q/k/v
    layer_map.py   which teacher layer teaches which student layer
    projectors.py  student width -> teacher width (identity, linear, MLP)
    preprocess.py  the teacher's statistics for loss.hidden.preprocess standardize / whitening
    distiller.py   FeatureDistiller: layer pairs, projectors, the hidden-state and
                   attention-relation terms (the pure losses live in potstill.losses.features)
"""
