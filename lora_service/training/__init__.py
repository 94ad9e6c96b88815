"""The training child (torch side): `python -m lora_service.training` runs a planned run
(`run`, `trainer`, `data`, `checkpoint`), and the one-shot jobs the torch-free side asks of it
(register the base model, import an adapter, draw a sample or an A/B sheet)."""
