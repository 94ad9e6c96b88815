"""The labelling child (torch side): `python -m lora_service.labelling` captions images with
open_clip (`models.clip`). The daemon and `lora-service label` reach it only as a process,
through `inbox.labeller`."""
