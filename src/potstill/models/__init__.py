"""The models themselves: loading, the student's construction, heads, precision, quantization.

    loading.py        a causal LM or tokenizer from a hub id, a folder, or an object; freeze
    teacher_model.py  the frozen (optionally quantized) teacher model and its tokenizer
    students.py       the trainable student: loaded, built from a config, or cut from the teacher
    vocab.py          teacher and student share a vocabulary (padding rows aside)
    vocab_map.py      across tokenizers: the bytes each token spells, ids that spell the same
    layers.py         where a model keeps its decoder blocks
    heads.py          the output head as (weight, bias, softcap), where logits are exactly that
    hidden.py         final hidden states without B x T x V logits (the chunked path)
    precision.py      bf16 / fp16 / fp32: choice, autocast, dtypes
    bitnet.py         BitNet b1.58 ternary layers and the packed format's reader
    quantize.py       int8 / int4 teachers (torchao, bitsandbytes); int4.py: the CPU int4 layer
"""
