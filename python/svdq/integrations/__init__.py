"""svdq inside other libraries' own APIs.

diffusers_quantizer  the ``"svdquant"`` diffusers quantizer: ``ModelMixin.from_pretrained`` / ``save_pretrained``
                     and ``DiffusionPipeline.from_pretrained`` load and write svdq models (registered on import
                     of svdq)
diffusers_lora       diffusers' LoRA API (``pipe.load_lora_weights``, ``set_adapters``, ...) on svdq models,
                     routed to `svdq.load_lora` & co. (hot-swap on the low-rank branch, no requantization)
"""
