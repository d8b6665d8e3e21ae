"""lorakit inside other libraries' training loops (transformers' Trainer, TRL, Accelerate): see :mod:`.hf`.

Application code: the library core never imports this package.
"""
