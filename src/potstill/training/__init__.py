"""The training run: one loop, one objective, atomic checkpoints.

    loop.py        train(cfg): the run top to bottom, the per-step body, resume, evaluation, checkpoints
    setup.py       build_run: models, data, teacher source, objective, optimizer, loss path
    tokens.py      where each step's tokens come from (the data, in a step-determined order)
    forward.py     the student's forward in the form its loss path needs
    objective.py   the weighted loss terms, the form picked from the teacher signal's kind, normalization
    evaluation.py  perplexity, KL to the teacher, top-1 agreement
    checkpoint.py  run lock, atomic verified checkpoints, RNG state
    rundir.py      the run directory: no clobbering, the student and summary published atomically
    metrics.py     metrics.jsonl, TensorBoard, peak memory, run info
"""
