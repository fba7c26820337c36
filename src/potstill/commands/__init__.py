"""The potstill verbs, each a thin function over the layers below, and the command line.

    cli.py         ``potstill COMMAND``: argument parsing, one-line errors
    distill.py     ``distill``: one run, or the stages of a ``stages:`` config (stages.py)
    evaluate.py    ``evaluate``: score a run or a model folder
    generate.py    ``generate``: the teacher answers the data's prompts (sequence-level KD)
    export.py      ``export --bitnet``: the packed 1.58-bit model
    quickstart.py  ``quickstart``: the offline demo; report.py: its table and plot

``cache-teacher`` is :func:`potstill.teachers.capture.cache_teacher`.
"""
