"""lorakit inside other libraries' training loops (transformers' Trainer, TRL, Accelerate): see :mod:`.hf`;
local transformers checkpoints loaded for ``lorakit train`` and ``lorakit merge``: see :mod:`.local_models`.

Application code: the library core never imports this package.
"""
